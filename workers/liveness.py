"""Whether a lane has workers consuming it: how the sweeper tells a late saga from a lost one.

Every worker, while its consumer runs (connected, taking messages), marks each queue it
consumes in a sorted set of the broker's Redis, every ``BEAT_SECONDS``, with the time.
A lane is alive when some worker marked it within ``ALIVE_SECONDS``. A worker stopped,
killed or cut off from Redis stops marking; after a clean stop it removes its mark.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from celery import bootsteps
from redis import Redis

logger = logging.getLogger(__name__)

#: How often a consuming worker marks its lanes.
BEAT_SECONDS = 2.0
#: A lane marked within this long has a consumer.
ALIVE_SECONDS = 10.0


def _key(queue: str) -> str:
    return f"orders:consumers:{queue}"


def mark(redis: Redis, queues: list[str], worker: str, now: float | None = None) -> None:
    """Note that ``worker`` consumes ``queues`` now (and forget long-silent workers)."""
    now = time.time() if now is None else now
    with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zadd(_key(queue), {worker: now})
            pipe.zremrangebyscore(_key(queue), "-inf", now - 10 * ALIVE_SECONDS)
        pipe.execute()


def unmark(redis: Redis, queues: list[str], worker: str) -> None:
    """Note that ``worker`` stopped consuming ``queues``."""
    with redis.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zrem(_key(queue), worker)
        pipe.execute()


def consumers(redis: Redis, queue: str, now: float | None = None) -> int:
    """How many workers consumed ``queue`` within ``ALIVE_SECONDS``."""
    now = time.time() if now is None else now
    return int(redis.zcount(_key(queue), now - ALIVE_SECONDS, "+inf"))


class LaneHeartbeat(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer step: marks the worker's lanes while it consumes them."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer: Any = None
        self._queues: list[str] = []
        self._worker = f"{getattr(parent, 'hostname', None) or socket.gethostname()}"

    def start(self, parent: Any) -> None:
        """Mark now, then every ``BEAT_SECONDS``."""
        self._queues = sorted(q.name for q in parent.task_consumer.queues)
        redis: Redis = parent.app.orders_runtime.redis

        def beat() -> None:
            try:
                mark(redis, self._queues, self._worker)
            except Exception as exc:  # Redis down: the lane looks idle, which is true
                logger.warning("could not mark lanes %s as consumed: %r", self._queues, exc)

        beat()
        self._timer = parent.timer.call_repeatedly(BEAT_SECONDS, beat)

    def stop(self, parent: Any) -> None:
        """Stop marking, and say so at once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            unmark(parent.app.orders_runtime.redis, self._queues, self._worker)
        except Exception as exc:
            logger.warning("could not unmark lanes %s: %r", self._queues, exc)

    def shutdown(self, parent: Any) -> None:
        """As ``stop``."""
        self.stop(parent)
