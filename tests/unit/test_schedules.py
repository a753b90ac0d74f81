"""Beat's schedules and the window a run belongs to."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta

import pytest
from celery.schedules import crontab

from config import names
from config.celeryconf import celery_config
from config.schedules import AlignedEvery, credit_check_schedule, window_key
from config.settings import ConfigError, Settings


def test_an_aligned_schedule_is_due_once_per_tick() -> None:
    every = AlignedEvery(5)
    long_ago = datetime.now(UTC) - timedelta(minutes=1)
    due, next_in = every.is_due(long_ago)
    assert due and 0 < next_in <= 5
    just_now = datetime.now(UTC)
    assert not every.is_due(just_now).is_due


def test_beat_can_store_and_rebuild_an_aligned_schedule() -> None:
    rebuilt = pickle.loads(pickle.dumps(AlignedEvery(7)))  # noqa: S301 - our own object
    assert isinstance(rebuilt, AlignedEvery) and rebuilt.every == 7


def test_two_beats_firing_one_tick_share_its_window() -> None:
    settings = Settings(credit_check_every_seconds=10)
    tick = datetime(2026, 11, 22, 2, 0, 10, tzinfo=UTC)
    assert window_key(settings, tick + timedelta(milliseconds=40)) == window_key(
        settings, tick + timedelta(seconds=3)
    )
    assert window_key(settings, tick) != window_key(settings, tick + timedelta(seconds=10))
    nightly = Settings()
    assert window_key(nightly, tick) == "2026-11-22T02:00:00+00:00"


def test_the_credit_check_runs_nightly_unless_told_otherwise() -> None:
    schedule = credit_check_schedule(Settings())
    assert isinstance(schedule, crontab)
    assert schedule.hour == {2} and schedule.minute == {0}
    assert isinstance(credit_check_schedule(Settings(credit_check_every_seconds=3)), AlignedEvery)
    with pytest.raises(ConfigError, match="5 fields"):
        credit_check_schedule(Settings(credit_check_cron="0 2 *"))


def test_beat_runs_the_retention_job_in_its_lane_every_interval() -> None:
    settings = Settings(retention_interval_seconds=120)
    entry = celery_config(settings)["beat_schedule"]["retention"]
    assert entry["task"] == names.RETAIN and entry["schedule"] == 120
    assert entry["options"]["expires"] == 240  # a run that waited two periods is dropped
    assert names.ROUTES[names.RETAIN] == names.Lane.HOUSEKEEPING
