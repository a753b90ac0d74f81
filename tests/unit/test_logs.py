"""Logs an operator can read: JSON when asked (and by default in production), and no line
per run of the housekeeping beat sends every second."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.app import trace
from celery.worker import strategy

from config import names
from config.logs import QUIET_TASKS, JsonFormatter, QuietTasks, gunicorn_logconfig
from config.settings import Settings, load_settings
from workers.runtime import Runtime
from workers.tasks import register_tasks
from workers.webhooks import register_webhook_tasks


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.addFilter(QuietTasks())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Iterator[Kept]:
    """What a handler with the filter keeps of Celery's own records."""
    handler = Kept()
    celery_logger = logging.getLogger("celery")
    level, celery_logger.level = celery_logger.level, logging.INFO
    celery_logger.addHandler(handler)
    try:
        yield handler
    finally:
        celery_logger.removeHandler(handler)
        celery_logger.setLevel(level)


def context(task: str) -> dict[str, object]:
    return {
        "id": "abc",
        "name": task,
        "args": "()",
        "kwargs": "{}",
        "eta": None,
        "runtime": 0.01,
        "return_value": "0",
    }


def test_celerys_routine_lines_about_housekeeping_runs_are_dropped(kept: Kept) -> None:
    for task in (names.RELAY_OUTBOX, names.SWEEP_SAGAS):
        # As the worker logs a message it received, and the pool a task that succeeded.
        strategy.logger.info(trace.LOG_RECEIVED, context(task), extra={"data": context(task)})
        trace.info(trace.LOG_SUCCESS, context(task))
    # As the worker logs a run that waited past its expiry (the next one supersedes it).
    logging.getLogger("celery.worker.request").info(
        "Discarding revoked task: %s[%s]", names.RELAY_OUTBOX, "abc"
    )
    # As beat logs what it sends.
    logging.getLogger("celery.beat").info(
        "Scheduler: Sending due task %s (%s)", "relay-outbox", names.RELAY_OUTBOX
    )
    assert kept.records == []


def test_lines_about_sagas_failures_and_what_a_run_did_are_kept(kept: Kept) -> None:
    trace.info(trace.LOG_RECEIVED, context(names.RESERVE_STOCK))
    trace.info(trace.LOG_SUCCESS, context(names.RESERVE_STOCK))
    logging.getLogger("celery.beat").info(
        "Scheduler: Sending due task %s (%s)", "credit-check", names.START_CREDIT_CHECK
    )
    failed = context(names.RELAY_OUTBOX)
    logging.getLogger("celery.app.trace").error(
        trace.LOG_FAILURE,
        {**failed, "exc": "boom", "description": "raised"},
        extra={"data": failed},
    )
    logging.getLogger("celery.beat").warning("beat: lost the lock; standing by until it is free")
    logging.getLogger("celery.worker.consumer").info("Connected to %s", "redis://")
    messages = [record.getMessage() for record in kept.records]
    assert len(messages) == 6, messages
    assert any(names.RELAY_OUTBOX in m and "raised" in m for m in messages)


def test_the_quiet_tasks_send_no_task_events_and_the_others_do() -> None:
    app = Celery("test", set_as_current=False)
    runtime = Runtime(Settings())
    register_tasks(app, runtime)
    register_webhook_tasks(app, runtime)
    quiet = {name for name, task in app.tasks.items() if not task.send_events}
    assert quiet == QUIET_TASKS
    assert app.tasks[names.RESERVE_STOCK].send_events
    assert app.tasks[names.START_CREDIT_CHECK].send_events


def test_logs_are_json_by_default_in_production_and_text_elsewhere() -> None:
    assert load_settings({"APP_ENV": "production"}).log_format == "json"
    assert load_settings({"APP_ENV": "production", "LOG_FORMAT": "text"}).log_format == "text"
    assert load_settings({"APP_ENV": "local"}).log_format == "text"
    assert load_settings({"APP_ENV": "local", "LOG_FORMAT": "JSON"}).log_format == "json"


def test_gunicorn_writes_its_own_lines_as_json_records_under_json_only() -> None:
    assert gunicorn_logconfig(Settings(log_format="text")) == {}
    config = gunicorn_logconfig(Settings(log_format="json", log_level="WARNING"))
    assert config["formatters"]["json"]["()"] is JsonFormatter
    assert {h["formatter"] for h in config["handlers"].values()} == {"json"}
    # Both gunicorn's loggers pass their records to the root's JSON handler.
    for name in ("gunicorn.error", "gunicorn.access"):
        assert config["loggers"][name] == {
            "level": config["loggers"][name]["level"],
            "handlers": [],
            "propagate": True,
        }
    assert config["loggers"]["gunicorn.error"]["level"] == "WARNING"
    record = logging.LogRecord(
        "gunicorn.error", logging.INFO, __file__, 1, "Booting %s", (7,), None
    )
    assert json.loads(JsonFormatter().format(record))["message"] == "Booting 7"


def test_log_quiet_tasks_0_keeps_the_housekeeping_lines() -> None:
    from config.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        for environ, quiet in (({}, True), ({"LOG_QUIET_TASKS": "0"}, False)):
            settings = load_settings(environ)
            assert settings.log_quiet_tasks is quiet
            configure_logging(settings)
            (handler,) = root.handlers
            assert any(isinstance(f, QuietTasks) for f in handler.filters) is quiet
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
