"""The fixes in workers.compat, each shown against a real Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from scripts.services import LocalRedis
from workers.compat import apply_fixes


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
