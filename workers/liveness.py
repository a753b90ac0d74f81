"""Whether a lane is being worked off: how the sweeper tells a late saga from a lost one.

Every worker, while its consumer runs (connected, taking messages), marks each queue it
consumes in a sorted set of the broker's Redis, every ``BEAT_SECONDS``, with Redis's own
clock (hosts' clocks may differ). A lane is consumed when some worker marked it within
``ALIVE_SECONDS``; a worker stopped, killed or cut off from Redis stops marking, and
after a clean stop it removes its mark at once. A lane has caught up when it is consumed
and fewer than ``CAUGHT_UP_DEPTH`` messages wait in it: an overdue saga's message is then
no longer queued (it is lost, or running right now), so dispatching it again sends no
copy of a backlog.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import bootsteps
from redis import Redis

logger = logging.getLogger(__name__)

#: How often a consuming worker marks its lanes.
BEAT_SECONDS = 2.0
#: A lane marked within this long has a consumer.
ALIVE_SECONDS = 10.0
#: A consumed lane with fewer messages waiting than this has caught up (well under a
#: second of work for a saga worker).
CAUGHT_UP_DEPTH = 50
#: kombu's Redis transport keeps a queue's prioritised messages in lists of their own.
_PRIORITY_SEPARATOR = "\x06\x16"


def depth(redis: Redis, queue: str) -> int:
    """How many messages wait in ``queue`` (every priority's list)."""
    keys = [queue, *(f"{queue}{_PRIORITY_SEPARATOR}{n}" for n in (3, 6, 9))]
    with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())


def caught_up(redis: Redis, queue: str) -> bool:
    """Whether ``queue`` is consumed and nearly empty (see the module's docstring)."""
    return consumers(redis, queue) > 0 and depth(redis, queue) < CAUGHT_UP_DEPTH


def _now(redis: Redis) -> float:
    seconds, micros = redis.time()
    return float(seconds) + micros / 1_000_000


def _key(queue: str) -> str:
    return f"orders:consumers:{queue}"


def mark(redis: Redis, queues: list[str], worker: str, now: float | None = None) -> None:
    """Note that ``worker`` consumes ``queues`` now (and forget long-silent workers)."""
    now = _now(redis) if now is None else now
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
    now = _now(redis) if now is None else now
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
