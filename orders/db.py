"""Building database engines. Nothing connects at import time."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import InterfaceError, OperationalError, TimeoutError

from config.settings import Settings


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
