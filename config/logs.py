"""Logging setup shared by every process (API, workers, beat).

Records carry the context of the work they belong to (order id, saga id, task name and
id, lane), bound with ``bind_log_context`` by the API per request and by the workers per
task. ``LOG_FORMAT=json`` writes one JSON object per line; the default is plain text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

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


def configure_logging(settings: Settings) -> None:
    """Send log records to stderr, as text or JSON lines, at the configured level."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
