"""The fixes in workers.compat, each shown against a real Redis."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from scripts.services import LocalRedis
from workers import dlq
from workers.compat import UNREADABLE, UNREADABLE_REASON, apply_fixes


def test_a_channel_whose_broker_connection_was_torn_down_fails_softly_and_keeps_messages(
    tmp_path: Path,
) -> None:
    apply_fixes()
    redis = LocalRedis(tmp_path, password="compat")
    redis.start()
    try:
        queue = Queue("compat", Exchange("compat"), routing_key="compat")
        with Connection(redis.url()) as publisher:
            publisher.Producer().publish(
                {"n": 1}, exchange=queue.exchange, routing_key="compat", declare=[queue]
            )
        consumer = Connection(redis.url())
        channel: Any = consumer.default_channel
        message = channel.basic_get("compat", no_ack=False)
        assert message is not None  # held, not acknowledged

        # The state a worker is in after losing Redis (as seen in chaos runs): Celery
        # collected the connection, detaching the transport; the channel is still open.
        consumer._do_close_transport()
        consumer.close()  # raised AttributeError, stopping the worker, before the fix
        # A task that finishes now cannot be acknowledged: a connection error, which
        # Celery logs, rather than an AttributeError, which stopped the worker.
        with pytest.raises(RedisConnectionError):
            message.ack()

        # Still in the unacknowledged set: handed back after the visibility timeout.
        assert Redis.from_url(redis.url()).hlen("unacked") == 1
    finally:
        redis.stop()


def test_a_channel_publishes_with_one_redis_client_and_keeps_it_across_a_redis_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply_fixes(publisher=True)
    built: list[bool] = []
    create = kombu_redis.Channel._create_client

    def counted(self: Any, asynchronous: bool = False) -> Any:
        built.append(asynchronous)
        return create(self, asynchronous)

    monkeypatch.setattr(kombu_redis.Channel, "_create_client", counted)
    redis = LocalRedis(tmp_path, password="compat", appendonly=True)
    redis.start()
    try:
        queue = Queue("compat", Exchange("compat"), routing_key="compat")
        with Connection(redis.url()) as conn:
            producer = conn.Producer()
            for n in range(40):
                producer.publish(
                    {"n": n}, exchange=queue.exchange, routing_key="compat", declare=[queue]
                )
            # Redis restarts: the channel's client takes new connections from its pool.
            redis.stop()
            redis.start()
            for n in range(40, 60):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key="compat")
        # One client built to publish 60 messages (one per message before the fix: each
        # costs a table of reply handlers, about 0.6 ms of CPU).
        assert built.count(False) == 1
        items = Redis.from_url(redis.url()).lrange("compat", 0, -1)
        bodies = [json.loads(base64.b64decode(json.loads(item)["body"])) for item in items]
        assert sorted(body["n"] for body in bodies) == list(range(60))
    finally:
        redis.stop()


def test_list_items_kombu_cannot_read_arrive_as_stand_ins_holding_their_bytes(
    tmp_path: Path,
) -> None:
    apply_fixes()
    redis = LocalRedis(tmp_path, password="compat")
    redis.start()
    try:
        queue = Queue("compat", Exchange("compat"), routing_key="compat")
        untagged = {"body": "", "headers": {}, "properties": {"delivery_info": {}}}
        unreadable = {
            b"\xff\xfe not JSON, not even UTF-8": dlq.UNDECODABLE,
            b'{"a JSON object": "not an envelope"}': dlq.NOT_AN_ENVELOPE,
            b"[1, 2, 3]": dlq.NOT_AN_ENVELOPE,
            json.dumps(untagged).encode(): dlq.NOT_AN_ENVELOPE,
        }
        client = Redis.from_url(redis.url())
        client.lpush("compat", *unreadable)  # read in this order, then a message kombu wrote
        with Connection(redis.url()) as conn:
            conn.Producer().publish(
                {"n": 1}, exchange=queue.exchange, routing_key="compat", declare=[queue]
            )
            received: list[Any] = []
            with conn.Consumer(queue, on_message=received.append):
                deadline = time.monotonic() + 10
                while len(received) < len(unreadable) + 1 and time.monotonic() < deadline:
                    # Raised at the first item, losing it, before the fix.
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=1)

            *stand_ins, message = received
            assert [(m.headers[UNREADABLE], m.body) for m in stand_ins] == [
                (kind, item) for item, kind in unreadable.items()
            ]
            assert all(m.headers[UNREADABLE_REASON] for m in stand_ins)
            assert message.decode() == {"n": 1} and UNREADABLE not in message.headers
            # Like any message, each waits in the unacknowledged set until acknowledged.
            assert client.hlen("unacked") == len(received)
            for each in received:
                each.ack()
            assert client.hlen("unacked") == 0 and client.llen("compat") == 0
    finally:
        redis.stop()
