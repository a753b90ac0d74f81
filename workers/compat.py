"""Fixes for the pinned Celery and kombu versions (see setup.cfg), each with its reason.

Applied by ``workers.celery_app.create_celery``: every fix to worker processes, the one
that concerns publishing also to the API's. Each fix checks the behaviour it corrects
and is covered by a test that fails without it.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from redis.exceptions import ConnectionError as RedisConnectionError

from workers import dlq

#: Header of a stand-in message: the kind of dead letter the list item it carries is
#: (workers.dlq), and why kombu could not read the item.
UNREADABLE = "x-unreadable-item"
UNREADABLE_REASON = "x-unreadable-reason"
#: Content type of a stand-in's body, the item's bytes: no worker decodes it.
UNREADABLE_CONTENT_TYPE = "application/x-unreadable-item"
#: Bytes of an unreadable item its stand-in carries: more than a dead letter keeps.
UNREADABLE_KEEP_BYTES = 4 * (dlq.KEEP_CHARS + 1)

_applied: set[str] = set()


def apply_fixes(*, publisher: bool = False) -> None:
    """Install the fixes, each once: a ``publisher`` (the API) only the one it needs."""
    fixes = [_one_redis_client_per_channel]
    if not publisher:
        fixes += [
            _a_detached_channel_raises_a_connection_error,
            _an_unreadable_list_item_arrives_as_a_stand_in,
        ]
    for fix in fixes:
        if fix.__name__ not in _applied:
            fix()
            _applied.add(fix.__name__)


def _one_redis_client_per_channel() -> None:
    """One Redis client per channel, not one per command (kombu 5.7.0, redis 8.1.0).

    The Redis transport builds a new ``redis.Redis`` for each publish, acknowledgement
    and task event (``Channel.conn_or_acquire``), and redis-py fills a case-insensitive
    table of about 170 reply handlers in each one (redis/redis-py#3624): measured at
    0.6-0.7 ms of CPU per call on a 2-core machine, about ten calls per saga in the
    workers and two in the API. A client takes a connection from the channel's pool for
    each command and is safe to share between threads, so the channel keeps one and
    builds it again only when its pool changes. The pool is asked for first, as before:
    a channel whose transport was detached still raises a connection error there.
    """
    key = "_orders_shared_client"

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        shared = self.__dict__.get(key)
        if shared is None or shared.connection_pool is not pool:
            shared = self.__dict__[key] = self._create_client()
        yield shared

    kombu_redis.Channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]


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


def _an_unreadable_list_item_arrives_as_a_stand_in() -> None:
    """Read every item of a queue's Redis list as a message (kombu 5.7.0).

    The Redis transport pops an item off a queue's list (BRPOP), parses it as JSON and
    builds a message of it; an item that is not JSON, or not the envelope kombu writes,
    raises there, before any handler of Celery's sees it, so the worker stops
    ("Unrecoverable error") and the item, popped already, is lost. No extension point
    comes before that parse, so kombu's ``_brpop_read`` is replaced by a copy that
    differs in one call: such an item is delivered as a stand-in, a well-formed message
    whose body is the item's bytes and whose headers say what is wrong with it. The
    worker's consumer (workers.consumer) keeps the stand-in as a dead letter and
    acknowledges it; until then it waits in the unacknowledged set like any message.
    """

    def _brpop_read(self: Any, **options: Any) -> bool:
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                self.connection._deliver(envelope_of(self, item, dest), dest)  # the change
                return True
            else:
                raise Empty()
        finally:
            self._in_poll = None
            # The BRPOP connection is now idle: the moment to flush a pending re-auth.
            self._flush_brpop_reauth()

    kombu_redis.Channel._brpop_read = _brpop_read  # type: ignore[method-assign]


def envelope_of(channel: Any, item: bytes, queue: str) -> dict[str, Any]:
    """The envelope a list item holds, or a stand-in carrying the item if kombu could
    not build a message of it."""
    try:
        envelope = loads(bytes_to_str(item))
    except Exception as exc:  # not UTF-8, not JSON, a kombu type tag it cannot decode
        return stand_in(item, queue, dlq.UNDECODABLE, f"the item is not JSON: {exc}")
    fault = _envelope_fault(channel, envelope)
    if fault is not None:
        return stand_in(item, queue, *fault)
    return dict(envelope)


def _envelope_fault(channel: Any, envelope: Any) -> tuple[str, str] | None:
    """What keeps kombu from building a message of ``envelope``, and its Redis ack
    emulation from keeping it, if anything (the kind of dead letter, and why)."""
    if not isinstance(envelope, dict):
        return dlq.NOT_AN_ENVELOPE, f"the item is a JSON {type(envelope).__name__}, not an object"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return dlq.NOT_AN_ENVELOPE, "the item has no properties"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return dlq.NOT_AN_ENVELOPE, "the item has no delivery tag"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
        isinstance(info.get(key), str) for key in ("exchange", "routing_key")
    ):
        return dlq.NOT_AN_ENVELOPE, "the item has no delivery info (exchange, routing key)"
    if not isinstance(envelope.get("headers"), dict):
        return dlq.NOT_AN_ENVELOPE, "the item has no headers"
    for key in ("content-type", "content-encoding", "body"):
        if not isinstance(envelope.get(key), str | None):
            return dlq.NOT_AN_ENVELOPE, f"the item's {key} is not a string"
    encoding = properties.get("body_encoding")
    if envelope.get("body"):
        try:
            channel.decode_body(envelope["body"], encoding)
        except Exception as exc:
            return dlq.UNDECODABLE, f"the body is not in its encoding {encoding!r}: {exc}"
    return None


def stand_in(item: bytes, queue: str, kind: str, reason: str) -> dict[str, Any]:
    """A message carrying an item that is not one (its first UNREADABLE_KEEP_BYTES)."""
    return {
        "body": base64.b64encode(item[:UNREADABLE_KEEP_BYTES]).decode("ascii"),
        "content-encoding": "binary",
        "content-type": UNREADABLE_CONTENT_TYPE,
        "headers": {UNREADABLE: kind, UNREADABLE_REASON: reason, "x-item-bytes": len(item)},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }
