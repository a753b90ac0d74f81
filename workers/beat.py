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
  back to waiting for it and, once it holds it again, installs the schedule again;
- serves its figures to Prometheus on ``BEAT_METRICS_PORT`` (``BeatFigures``): whether it
  holds the lock, when it last ticked, and per schedule entry how many tasks it sent and
  when it last did. A standby beat answers too (lock 0, nothing sent).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from celery.utils.log import get_logger
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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
from config.settings import Settings, load_settings

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

    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        #: Unix time of the last tick (None before the first).
        self.last_tick: float | None = None
        #: Per schedule entry: tasks sent, and the Unix time of the last one.
        self.sent: dict[str, tuple[int, float]] = {}
        super().__init__(app, *args, **kwargs)
        if not kwargs.get("lazy"):  # the one that runs (a lazy one only describes it)
            runtime = getattr(app, "orders_runtime", None)
            _serve_metrics(self, runtime.settings if runtime else load_settings())

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kw: Any) -> Any:
        """Send the entry's task, and count it."""
        result = super().apply_async(entry, producer=producer, advance=advance, **kw)
        count, _ = self.sent.get(entry.name, (0, 0.0))
        self.sent[entry.name] = (count + 1, time.time())
        return result

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        """Send what is due if this beat holds the lock; otherwise try to take it."""
        self.last_tick = time.time()
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


class BeatFigures(Collector):
    """What a scrape reads of this beat's scheduler."""

    def __init__(self, scheduler: FailoverScheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        """The scheduler's figures now."""
        scheduler = self.scheduler
        yield GaugeMetricFamily(
            "orders_beat_lock_held",
            "1 while this beat holds the lock and sends the schedule, 0 while it stands by.",
            value=0 if scheduler.lock is None else 1,
        )
        if scheduler.last_tick is not None:
            yield GaugeMetricFamily(
                "orders_beat_last_tick_timestamp_seconds",
                "When this beat last ticked (Unix time).",
                value=scheduler.last_tick,
            )
        sent = CounterMetricFamily(
            "orders_beat_sent", "Tasks this beat sent, by schedule entry.", labels=["entry"]
        )
        last = GaugeMetricFamily(
            "orders_beat_last_sent_timestamp_seconds",
            "When this beat last sent each schedule entry's task (Unix time).",
            labels=["entry"],
        )
        for name, (count, at) in sorted(scheduler.sent.items()):
            sent.add_metric([name], count)
            last.add_metric([name], at)
        yield sent
        yield last


#: The port this process serves on (one server per process, whatever the schedulers).
_serving: list[int] = []


def _serve_metrics(scheduler: FailoverScheduler, settings: Settings) -> None:
    """Serve the scheduler's figures on BEAT_METRICS_PORT (0: not at all)."""
    port = settings.beat_metrics_port
    if not port or _serving:
        return
    registry = CollectorRegistry()
    registry.register(BeatFigures(scheduler))
    try:
        start_http_server(port, addr=settings.worker_metrics_bind, registry=registry)
    except OSError as exc:  # beat's work goes on without its figures
        logger.warning("beat: no metrics on %s:%d: %s", settings.worker_metrics_bind, port, exc)
        return
    _serving.append(port)
    logger.info("beat: metrics on %s:%d", settings.worker_metrics_bind, port)
