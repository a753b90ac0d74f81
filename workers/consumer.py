"""The worker's consumer: messages it cannot even hand to a task become dead letters."""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.utils.encoding import safe_repr

from workers import dlq

logger = logging.getLogger(__name__)


class DeadLetteringConsumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, keeping undecodable messages and unknown tasks as dead letters
    (Celery itself only logs them and drops them)."""

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A message whose body cannot be decoded (not JSON, a refused serializer)."""
        headers = message.headers or {}
        self._dead_letter(
            task_id=headers.get("id"),
            task_name=str(headers.get("task", "(undecodable)")),
            kind="undecodable",
            error=f"{type(exc).__name__}: {exc}",
            raw=safe_repr(message.body),
            queue=(message.delivery_info or {}).get("routing_key"),
        )
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """A message naming a task no worker registers."""
        headers = message.headers or {}
        args, kwargs = None, None
        if isinstance(body, list | tuple) and len(body) >= 2:
            args, kwargs = body[0], body[1]
        self._dead_letter(
            task_id=headers.get("id"),
            task_name=str(headers.get("task", "(unknown)")),
            kind="unknown_task",
            error=f"{type(exc).__name__}: {exc}",
            args=args,
            kwargs=kwargs,
            queue=(message.delivery_info or {}).get("routing_key"),
        )
        super().on_unknown_task(body, message, exc)

    def _dead_letter(self, **letter: Any) -> None:
        try:
            dlq.record(self.app.orders_runtime.engine, **letter)
        except Exception:
            logger.exception("could not keep a dead letter: %r", letter)
