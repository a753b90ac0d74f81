"""Building database engines. Nothing connects at import time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Engine, create_engine

from config import tracing
from config.settings import Settings

logger = logging.getLogger(__name__)

#: Constraint names follow one pattern, so migrations can name them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def make_engine(settings: Settings, *, application_name: str = "orders") -> Engine:
    """Create this process's engine; a forked process must build its own.

    Every session gets the statement, lock and idle-in-transaction timeouts of the
    settings: a statement stuck on a lock, or a transaction left open by a process that
    hung, fails (transiently) instead of holding rows for ever.

    A statement's parameters never appear in its errors (``hide_parameters``): the
    errors are logged and kept for operators, and parameters hold customers' data."""
    pool = settings.db_pool
    timeouts = " ".join(
        f"-c {name}={int(seconds * 1000)}"
        for name, seconds in (
            ("statement_timeout", settings.db_statement_timeout_seconds),
            ("lock_timeout", settings.db_lock_timeout_seconds),
            ("idle_in_transaction_session_timeout", settings.db_idle_in_transaction_seconds),
        )
    )
    engine = create_engine(
        settings.database_url,
        pool_size=pool.pool_size,
        max_overflow=pool.max_overflow,
        hide_parameters=True,
        pool_timeout=pool.pool_timeout,
        pool_recycle=pool.pool_recycle,
        # No pre-ping (a round trip and a transaction per checkout): a connection broken
        # by a database restart fails once, the pool then drops every older connection,
        # and the caller retries (tasks) or answers 503 (API).
        connect_args={
            "application_name": application_name,
            "connect_timeout": 5,
            "options": timeouts,
        },
    )
    tracing.instrument_engine(engine)  # each statement a span, when traces are on
    return engine


#: What each open ``transaction`` asked to run after its commit.
_after_commit: WeakKeyDictionary[Connection, list[Callable[[], None]]] = WeakKeyDictionary()


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()``, then, once it has committed, what the work inside asked for
    with ``after_commit`` (a cache write-through). A failing callback is logged: the
    transaction stands, and what the callback kept fresh falls back on its own expiry.

    The error that ended the work is the one that leaves: nothing here touches the
    connection once it failed (a dropped connection stays an ``OperationalError``)."""
    callbacks: list[Callable[[], None]] = []
    with engine.begin() as conn:
        _after_commit[conn] = callbacks
        try:
            yield conn
        finally:
            _after_commit.pop(conn, None)
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.warning("an after-commit action failed", exc_info=True)


def after_commit(conn: Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` after the transaction of ``conn`` commits, if it was opened by
    ``transaction``; otherwise not at all (nothing waits for it)."""
    callbacks = _after_commit.get(conn)
    if callbacks is not None:
        callbacks.append(callback)


@contextmanager
def single_statements(engine: Engine) -> Iterator[Connection]:
    """A connection whose statements each run as their own transaction (the driver's
    autocommit): a lone read is one round trip instead of three (BEGIN, the read,
    ROLLBACK). For reads that need no snapshot shared with another statement: looking
    up a key, the newest event. The connection goes back to the pool as it came, in
    transactions."""
    with engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.autocommit = True
        try:
            yield conn
        finally:
            # Nothing was begun, so the rollback on the way back to the pool sends
            # nothing either. A connection that broke is discarded by the pool.
            with suppress(Exception):
                driver.autocommit = False
