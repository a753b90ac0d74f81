"""Logging setup shared by every process (API, workers, beat).

Records carry the context of the work they belong to (order id, saga id, task name and
id, lane), bound with ``bind_log_context`` by the API per request and by the workers per
task. ``LOG_FORMAT=json`` writes one JSON object per line; the default is plain text.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config import names
from config.settings import Settings

#: One line per record, with the process id: several processes write to one terminal.
LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s%(context)s"
#: The context fields, in the order they are shown.
CONTEXT_FIELDS = ("order_id", "saga_id", "task", "task_id", "lane", "trace_id")

_context: ContextVar[dict[str, str]] = ContextVar("log_context", default={})  # noqa: B039


def bind_log_context(**fields: object) -> None:
    """Add fields to the context of every record logged from here on (this task or
    request); None removes a field."""
    merged = dict(_context.get())
    for name, value in fields.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = str(value)
    _context.set(merged)


def clear_log_context() -> None:
    """Forget the context (at the end of a task or request)."""
    _context.set({})


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Bind fields for the duration of a block."""
    token = _context.set({**_context.get(), **{k: str(v) for k, v in fields.items()}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Puts the bound context on every record (``record.context`` for text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the context; never drop a record."""
        context = _context.get()
        record.log_context = context
        record.context = "".join(f" {k}={context[k]}" for k in CONTEXT_FIELDS if k in context)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, context."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            **getattr(record, "log_context", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


#: The housekeeping tasks: beat sends them every few seconds, they run on their own lane.
#: Celery logs nothing at INFO about their runs and sends no task events for them (Flower's
#: task list is the sagas'); a run logs what it did only when it did something.
QUIET_TASKS = frozenset(
    {
        names.RELAY_OUTBOX,
        names.SWEEP_SAGAS,
        names.CHECK_EVENTS,
        names.SWEEP_BATCH_RUNS,
        names.RETAIN,
        names.SEND_WEBHOOKS,
    }
)
#: Celery's loggers of a task's routine lines: received (the worker), succeeded (the
#: pool), discarded once past its expiry (the worker: the next run supersedes it),
#: sending (beat).
_ROUTINE_LOGGERS = frozenset(
    {"celery.worker.strategy", "celery.app.trace", "celery.worker.request", "celery.beat"}
)


class QuietTasks(logging.Filter):
    """Drops Celery's INFO (and DEBUG) lines about runs of the quiet tasks: "Task ...
    received", "Task ... succeeded in ...", "Discarding revoked task" (expired), beat's
    "Sending due task". Warnings and errors (a run that failed) pass, as does every line
    about any other task."""

    def __init__(self, tasks: frozenset[str] = QUIET_TASKS) -> None:
        super().__init__()
        self.tasks = tasks

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a routine line of a quiet task."""
        if record.levelno > logging.INFO or record.name not in _ROUTINE_LOGGERS:
            return True
        return _task_of(record) not in self.tasks


def _task_of(record: logging.LogRecord) -> str | None:
    """The task a Celery record is about: trace and strategy pass its context as a mapping
    (``extra={"data": ...}``); a request passes (task name, task id...), beat (entry
    name, task name)."""
    data = getattr(record, "data", None)
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        return str(data["name"])
    args = record.args
    if not isinstance(args, tuple) or len(args) < 2:
        return None
    return str(args[1] if record.name == "celery.beat" else args[0])


def configure_logging(settings: Settings) -> None:
    """Send log records to stderr, as text or JSON lines, at the configured level. Under
    JSON, warnings and anything written to standard output or error become records too."""
    json_lines = settings.log_format == "json"
    # The process's own stream, even when a previous call replaced sys.stderr.
    handler = logging.StreamHandler(sys.__stderr__ if json_lines else None)
    handler.addFilter(ContextFilter())
    if settings.log_quiet_tasks:
        handler.addFilter(QuietTasks())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    if json_lines:
        logging.captureWarnings(True)
        _records_for_output()


def _records_for_output() -> None:
    """Make what is written to standard output or error log records: one per write, INFO
    for output, WARNING for errors, through Celery's proxy (the one its
    ``worker_redirect_stdouts`` installs). ``sys.__stdout__`` too, where Celery writes its
    shutdown notes (logged by ``json_celery`` instead); ``sys.__stderr__`` stays the
    stream itself: Celery's last resort inside signal handlers and failing handlers."""
    from celery.utils.log import LoggingProxy

    if isinstance(sys.stdout, LoggingProxy):
        return
    sys.stdout = sys.__stdout__ = LoggingProxy(logging.getLogger("stdout"), logging.INFO)  # type: ignore[misc]
    sys.stderr = LoggingProxy(logging.getLogger("stderr"), logging.WARNING)


def gunicorn_logconfig(settings: Settings) -> dict[str, Any]:
    """gunicorn's ``logconfig_dict``: under JSON, its own lines (master and workers) as
    JSON records on standard error; otherwise empty (gunicorn's plain lines)."""
    if settings.log_format != "json":
        return {}
    stream = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {"console": stream, "error_console": stream},
        "root": {"level": settings.log_level, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": settings.log_level, "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        },
    }


def json_celery(app: Any, settings: Settings) -> None:
    """Under JSON, the ``celery`` command's processes write JSON lines only.

    ``celery worker`` and ``celery beat`` start as with ``--quiet`` (their banners are
    plain text on standard output; the worker's goes to one record instead, its shutdown
    note to another); in ``celery worker``, ``beat`` and ``flower`` (whose tornado would
    install its own plain handler) the JSON handler is installed as soon as the app is
    built, before anything is printed."""
    if settings.log_format != "json":
        return
    import click
    from celery.signals import celeryd_after_setup, worker_shutting_down

    quiet = click.Option(
        ["--orders-json-logs"],
        is_flag=True,
        hidden=True,
        expose_value=False,
        callback=_quiet_banner,
        help="(set by LOG_FORMAT=json) no banner",
    )
    for command in ("worker", "beat"):
        app.user_options[command].add(quiet)
    celeryd_after_setup.connect(_banner_as_record, weak=False, dispatch_uid="orders-json-banner")
    worker_shutting_down.connect(_shutdown_as_record, weak=False, dispatch_uid="orders-json-stop")
    if Path(sys.argv[0]).name == "celery" and _SERVICES & set(sys.argv[1:]):
        configure_logging(settings)


#: The ``celery`` subcommands that run as services (the others, ``inspect`` and the like,
#: print their answers as they are).
_SERVICES = frozenset({"worker", "beat", "flower"})


def _quiet_banner(ctx: Any, _param: Any, _value: Any) -> None:
    if ctx.obj is not None:
        ctx.obj.quiet = True


def _banner_as_record(sender: Any = None, instance: Any = None, **_: Any) -> None:
    if instance is not None and getattr(instance, "quiet", False):
        logging.getLogger("celery.apps.worker").info(
            "%s starting\n%s", sender, instance.startup_info(artlines=False).strip()
        )


def _shutdown_as_record(sender: Any = None, how: str = "", **_: Any) -> None:
    logging.getLogger("celery.apps.worker").info("%s: %s shutdown", sender, how)
