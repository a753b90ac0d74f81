"""Beat schedules, and the window of a tick (two beat processes firing one tick share it).

The credit check runs on a crontab (nightly by default); ``every N seconds, aligned``
is for tests and demos: its ticks fall on multiples of N seconds since the epoch, so
beats started at different times still tick together.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta

from celery.schedules import crontab, schedstate, schedule

from config.settings import ConfigError, Settings


class AlignedEvery(schedule):  # type: ignore[misc]
    """Every N seconds, on multiples of N seconds since the epoch."""

    def __init__(self, seconds: float) -> None:
        super().__init__(run_every=timedelta(seconds=seconds))
        self.every = seconds

    def __reduce__(self) -> tuple[type[AlignedEvery], tuple[float]]:
        """Beat keeps its schedule in a file: rebuild from the period alone."""
        return (self.__class__, (self.every,))

    def _last_tick(self, moment: float) -> float:
        return math.floor(moment / self.every) * self.every

    def is_due(self, last_run_at: datetime) -> schedstate:
        """Due once per tick; the next check at the next tick."""
        now = time.time()
        tick = self._last_tick(now)
        due = last_run_at.timestamp() < tick
        return schedstate(due, tick + self.every - now)

    def remaining_estimate(self, last_run_at: datetime) -> timedelta:
        """Time to the next tick."""
        now = time.time()
        return timedelta(seconds=self._last_tick(now) + self.every - now)


def credit_check_schedule(settings: Settings) -> schedule | crontab:
    """When beat starts the credit check."""
    if settings.credit_check_every_seconds:
        return AlignedEvery(settings.credit_check_every_seconds)
    fields = settings.credit_check_cron.split()
    if len(fields) != 5:
        raise ConfigError(f"CREDIT_CHECK_CRON needs 5 fields: {settings.credit_check_cron!r}")
    minute, hour, day_of_month, month, day_of_week = fields
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month,
        day_of_week=day_of_week,
    )


def window_key(settings: Settings, now: datetime | None = None) -> str:
    """The tick a run started now belongs to: the aligned tick, or the minute (a crontab
    fires at most once a minute)."""
    now = now or datetime.now(UTC)
    if settings.credit_check_every_seconds:
        seconds = settings.credit_check_every_seconds
        tick = math.floor(now.timestamp() / seconds) * seconds
        return datetime.fromtimestamp(tick, UTC).isoformat()
    return now.astimezone(UTC).replace(second=0, microsecond=0).isoformat()
