"""Fixes for the pinned Celery and kombu versions (see setup.cfg), each with its reason.

Applied by ``workers.celery_app.create_celery`` to worker processes. Each fix checks
the behaviour it corrects and is covered by a test that fails without it.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

_applied = False


def apply_fixes() -> None:
    """Install every fix once."""
    global _applied
    if _applied:
        return
    _a_detached_channel_raises_a_connection_error()
    _applied = True


def _a_detached_channel_raises_a_connection_error() -> None:
    """Survive losing Redis while acks_late tasks run (kombu 5.7.0).

    On a lost broker connection Celery collects the connection, which detaches the
    transport from its channels, and later closes them. Anything a detached channel
    still does with Redis (restoring the messages it holds unacknowledged when it
    closes, acknowledging a task that finishes after the loss) builds a client from the
    detached transport and raises AttributeError. That is not one of the connection
    errors Celery tolerates there, so the worker stops ("Unrecoverable error"). Raising
    a connection error instead lets Celery carry on: the messages stay in the broker's
    unacknowledged set, which hands them back after the visibility timeout.
    """
    original = kombu_redis.Channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError("the broker connection was closed")
        return original(self, asynchronous)

    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
