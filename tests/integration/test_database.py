"""config.database against the real PostgreSQL: single statements, and that a
connection they used goes back to the pool as it came."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Connection, Engine, create_engine, text

from config.database import single_statements


@pytest.fixture
def one_connection(engine: Engine) -> Iterator[Engine]:
    """An engine whose pool holds a single connection: every checkout is the same one."""
    only = create_engine(engine.url, pool_size=1, max_overflow=0)
    yield only
    only.dispose()


def _transaction_ids(conn: Connection) -> tuple[int, int]:
    first = conn.execute(text("SELECT txid_current()")).scalar_one()
    second = conn.execute(text("SELECT txid_current()")).scalar_one()
    return int(first), int(second)


def test_each_statement_is_its_own_transaction(one_connection: Engine) -> None:
    with single_statements(one_connection) as conn:
        first, second = _transaction_ids(conn)
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    assert second > first  # committed one by one: nothing is held open in between

    # The same connection, back from the pool: in transactions again, so that work
    # that fails is rolled back as a whole.
    with one_connection.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == backend
        first, second = _transaction_ids(conn)
    assert second == first
