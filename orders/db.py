"""Building database engines. Nothing connects at import time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import InterfaceError, OperationalError, TimeoutError

from config.settings import Settings

logger = logging.getLogger(__name__)

_AFTER_COMMIT = "orders.after_commit"


def make_engine(settings: Settings, *, application_name: str = "orders") -> Engine:
    """Create this process's engine; a forked process must build its own."""
    pool = settings.db_pool
    return create_engine(
        settings.database_url,
        pool_size=pool.pool_size,
        max_overflow=pool.max_overflow,
        pool_timeout=pool.pool_timeout,
        pool_recycle=pool.pool_recycle,
        # No pre-ping (a round trip and a transaction per checkout): a connection broken
        # by a database restart fails once, the pool then drops every older connection,
        # and the caller retries (tasks) or answers 503 (API).
        connect_args={"application_name": application_name, "connect_timeout": 5},
    )


#: Database errors that pass with time: connection refused or dropped, a deadlock or a
#: serialization failure (OperationalError), a pool with no free connection.
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError, TimeoutError)


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()``, then, once it has committed, what the work inside asked for
    with ``after_commit`` (a cache write-through). A failing callback is logged: the
    transaction stands, and what the callback kept fresh falls back on its own expiry."""
    callbacks: list[Callable[[], None]] = []
    with engine.begin() as conn:
        conn.info[_AFTER_COMMIT] = callbacks
        try:
            yield conn
        finally:
            conn.info.pop(_AFTER_COMMIT, None)
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.warning("an after-commit action failed", exc_info=True)


def after_commit(conn: Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` after the transaction of ``conn`` commits, if it was opened by
    ``transaction``; otherwise not at all (nothing waits for it)."""
    callbacks = conn.info.get(_AFTER_COMMIT)
    if callbacks is not None:
        callbacks.append(callback)
