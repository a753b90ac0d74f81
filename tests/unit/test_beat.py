"""Beat's scheduler: what it keeps of the schedule when the schedule goes through Redis."""

from __future__ import annotations

import json

from celery import Celery
from redbeat.decoder import RedBeatJSONDecoder, RedBeatJSONEncoder

from config.celeryconf import celery_config
from config.schedules import AlignedEvery
from config.settings import Settings
from workers.beat import Entry

SETTINGS = Settings(credit_check_every_seconds=4, beat_lock_timeout_seconds=10)


def test_beats_fail_over_through_a_lock_that_the_active_beat_renews_in_time() -> None:
    config = celery_config(SETTINGS)
    assert config["beat_scheduler"] == "workers.beat:FailoverScheduler"
    assert config["redbeat_lock_timeout"] == 10
    # Renewed at least every tick, several times within its timeout.
    assert config["beat_max_loop_interval"] * 3 < config["redbeat_lock_timeout"]
    assert config["redbeat_redis_url"] == SETTINGS.broker_url


def test_an_aligned_schedule_stays_aligned_when_read_back_from_redis() -> None:
    app = Celery("beat-test", set_as_current=False)
    app.config_from_object(celery_config(SETTINGS))
    configured = app.conf.beat_schedule["credit-check"]
    stored = json.dumps(
        {"name": "credit-check", "task": configured["task"], "schedule": configured["schedule"]},
        cls=RedBeatJSONEncoder,
    )
    read_back = json.loads(stored, cls=RedBeatJSONDecoder)
    assert not isinstance(read_back["schedule"], AlignedEvery)  # as JSON: a plain interval

    entry = Entry(app=app, **read_back)
    assert isinstance(entry.schedule, AlignedEvery) and entry.schedule.every == 4
