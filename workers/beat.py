"""Beat that fails over: celery-redbeat's scheduler, kept in the broker's Redis.

Any number of beat processes may run (``celery -A workers.app beat``, on any hosts): one
holds the lock (``BEAT_LOCK_TIMEOUT_SECONDS``, extended every tick) and sends; the others
wait for it. When the active beat dies, its lock expires and a standby takes over with
the schedule's last runs as they were stored in Redis (nothing starts from scratch: a
tick missed while nobody held the lock is sent once on takeover).

On top of redbeat this scheduler:

- keeps the credit check's aligned ticks (``CREDIT_CHECK_EVERY_SECONDS``): redbeat
  stores a schedule as JSON, which would make it a plain interval;
- rides out a Redis outage, or a Redis restarted empty, instead of exiting: a tick that
  cannot reach Redis is tried again a moment later, and a beat that lost its lock goes
  back to waiting for it and, once it holds it again, installs the schedule again.
"""

from __future__ import annotations

from typing import Any

from celery.utils.log import get_logger

# redbeat ships without type hints.
from redbeat import RedBeatScheduler  # type: ignore[import-untyped]
from redbeat.schedulers import (  # type: ignore[import-untyped]
    LUA_EXTEND_TO_SCRIPT,
    RedBeatSchedulerEntry,
    get_redis,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.schedules import AlignedEvery

logger = get_logger("celery.beat")

#: Seconds before a tick that could not reach Redis is tried again.
RETRY_SECONDS = 1.0


class Entry(RedBeatSchedulerEntry):  # type: ignore[misc]
    """A schedule entry; an aligned schedule of the configuration stays aligned."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        configured = (self.app.conf.beat_schedule or {}).get(self.name) or {}
        if isinstance(configured.get("schedule"), AlignedEvery):
            self.schedule = configured["schedule"]


class FailoverScheduler(RedBeatScheduler):  # type: ignore[misc]
    """redbeat's scheduler, standing by again (not exiting) when it loses its lock."""

    Entry = Entry
    lock: Any = None

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        """Send what is due if this beat holds the lock; otherwise try to take it."""
        try:
            if self.lock is None and not self._take_lock():
                return float(self.max_interval)
            return float(super().tick(min=min, **kwargs))
        except LockError:
            logger.warning("beat: lost the lock; standing by until it is free")
            self.lock = None
            return float(self.max_interval)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            logger.warning("beat: Redis unreachable (%s); trying again", exc)
            return RETRY_SECONDS

    def _take_lock(self) -> bool:
        """Take the lock if it is free; then (again) install the configured schedule,
        keeping the last runs Redis still has."""
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        # redbeat's extend sets the lock's time to live (redis-py's would add to it).
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            return False
        logger.info("beat: Acquired lock")
        self.lock = lock
        self.setup_schedule()
        return True
