"""config.database against the real PostgreSQL: single statements, and that a
connection they used goes back to the pool as it came; prepared statements."""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    String,
    bindparam,
    cast,
    column,
    create_engine,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Executable

import orders
import sagas
import workers
from config.database import PREPARED, _plan_of, make_engine, prepared, single_statements
from config.faults import is_transient
from config.settings import PoolPreset, Settings
from orders.tables import products
from tests.helpers import add_product


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


# --- Prepared statements -------------------------------------------------------------

#: A product's stock by id: the parameter twice (one $1) and a literal percent sign.
_STOCK = prepared(
    "test_stock",
    select(
        products.c.on_hand,
        (literal_column("'100%'", String) + cast(bindparam("id"), String)).label("tag"),
    ).where(products.c.id == bindparam("id")),
)
#: A division whose divisor the caller picks: zero fails after the statement is prepared.
_RATIO = prepared(
    "test_ratio", select(bindparam("on_hand", type_=Integer) / bindparam("by", type_=Integer))
)


@pytest.fixture
def single_pool(settings: Settings) -> Iterator[Engine]:
    """An engine as the system builds them, whose pool holds one connection."""
    pool = PoolPreset(pool_size=1, max_overflow=0, pool_timeout=5.0, pool_recycle=1800)
    only = make_engine(replace(settings, db_pool=pool), application_name="orders-tests")
    yield only
    only.dispose()


def _prepared_here(conn: Connection) -> list[Any]:
    return conn.execute(
        text(
            "SELECT name, statement, generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE '%on_hand%'"
        )
    ).all()


def test_a_prepared_statement_keeps_its_plan_on_the_connection(
    engine: Engine, single_pool: Engine
) -> None:
    product = add_product(engine, on_hand=7)
    plain = _STOCK.execution_options(prepared=False)
    for _ in range(8):
        with single_pool.connect() as conn:
            row = conn.execute(_STOCK, {"id": product}).one()
            assert tuple(row) == tuple(conn.execute(plain, {"id": product}).one())
    assert tuple(row) == (7, f"100%{product}")
    with single_pool.connect() as conn:
        (kept,) = [p for p in _prepared_here(conn) if "100%" in p.statement]
    assert kept.name == "test_stock"  # what pg_stat_activity shows: EXECUTE test_stock(...)
    # Planned for each of the first runs, then the plan kept is used.
    assert kept.generic_plans >= 1
    assert kept.custom_plans + kept.generic_plans == 8


def test_a_new_connection_prepares_afresh(engine: Engine, single_pool: Engine) -> None:
    product = add_product(engine, on_hand=3)
    with single_pool.connect() as conn:
        conn.execute(_STOCK, {"id": product}).one()
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with engine.begin() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    with pytest.raises(DBAPIError) as raised, single_pool.connect() as conn:
        conn.execute(_STOCK, {"id": product})
    assert is_transient(raised.value)  # the caller's retry...
    with single_pool.connect() as conn:  # ... meets a new connection, which prepares it
        assert conn.execute(_STOCK, {"id": product}).one().on_hand == 3
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert _prepared_here(conn)


def test_a_session_that_already_holds_the_name_fails_once_transiently(
    engine: Engine, single_pool: Engine
) -> None:
    """Behind a pooler that hands one server session to several clients (prepared
    statements left on by mistake), a first run may find the name taken: that fails as
    a transient error, and the statement runs as sent from then on."""
    product = add_product(engine, on_hand=5)
    with single_pool.connect() as conn:
        conn.execute(_STOCK, {"id": product}).one()
        name = conn.execute(
            text("SELECT name FROM pg_prepared_statements WHERE statement LIKE '%100%%'")
        ).scalar_one()
        conn.connection.info.clear()  # as a client that never prepared on this session
    with pytest.raises(DBAPIError) as raised, single_pool.connect() as conn:
        conn.execute(_STOCK, {"id": product})
    assert is_transient(raised.value)
    assert name in str(raised.value)
    with single_pool.connect() as conn:
        assert conn.execute(_STOCK, {"id": product}).one().on_hand == 5


def test_a_failing_statement_leaves_the_connection_and_the_statement_working(
    single_pool: Engine,
) -> None:
    # Failing with its PREPARE (whether that happened is unknown): runs plain from then on.
    with pytest.raises(DBAPIError), single_pool.connect() as conn:
        conn.execute(_RATIO, {"on_hand": 1, "by": 0})
    with single_pool.connect() as conn:
        assert conn.execute(_RATIO, {"on_hand": 6, "by": 3}).scalar_one() == 2
    # Failing once prepared: the prepared statement stays.
    with single_pool.connect() as conn:
        conn.execute(text("DEALLOCATE ALL"))
        conn.connection.info.clear()
        assert conn.execute(_RATIO, {"on_hand": 8, "by": 2}).scalar_one() == 4
    with pytest.raises(DBAPIError), single_pool.connect() as conn:
        conn.execute(_RATIO, {"on_hand": 1, "by": 0})
    with single_pool.connect() as conn:
        assert conn.execute(_RATIO, {"on_hand": 9, "by": 3}).scalar_one() == 3
        statements = conn.execute(text("SELECT statement FROM pg_prepared_statements")).scalars()
        assert any("/" in s for s in statements)


def _marked_statements() -> list[tuple[str, Executable]]:
    found = []
    for package in (orders, sagas, workers):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            for name, value in vars(importlib.import_module(module.name)).items():
                if isinstance(value, Executable) and value.get_execution_options().get(PREPARED):
                    found.append((f"{module.name}.{name}", value))
    return found


def test_every_statement_marked_prepared_prepares_against_the_schema(engine: Engine) -> None:
    """One PostgreSQL cannot prepare (a parameter whose type it cannot infer) would fail
    with its first PREPARE, then run unprepared: it must fail here instead."""
    marked = _marked_statements()
    assert len(marked) >= 10
    failed = {}
    with engine.connect() as conn:
        for where, statement in marked:
            # An IN list is rendered when run, a parameter per item: check it with one.
            sql = re.sub(
                r"__\[POSTCOMPILE_(\w+)\]",
                r"%(\1)s",
                str(statement.compile(dialect=engine.dialect)),
            )
            body = _plan_of(sql).body
            try:
                with conn.begin_nested():
                    conn.exec_driver_sql(f"PREPARE checked AS {body.replace('%%', '%')}")
                    conn.exec_driver_sql("DEALLOCATE checked")
            except DBAPIError as exc:
                failed[where] = str(exc.orig).splitlines()[0]
    assert failed == {}


def test_switched_off_nothing_is_prepared(engine: Engine, settings: Settings) -> None:
    """DB_PREPARED_STATEMENTS=0, for a pooler that shares server connections between
    transactions: every statement runs as sent."""
    product = add_product(engine, on_hand=2)
    pool = PoolPreset(pool_size=1, max_overflow=0, pool_timeout=5.0, pool_recycle=1800)
    plain = make_engine(replace(settings, db_pool=pool, db_prepared_statements=False))
    try:
        with plain.connect() as conn:
            assert conn.execute(_STOCK, {"id": product}).one().on_hand == 2
            assert conn.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar() == 0
    finally:
        plain.dispose()


def test_a_statement_whose_result_a_migration_changed_fails_once_transiently(
    owner_engine: Engine, single_pool: Engine
) -> None:
    """A deploy whose migration changes the type of a column a prepared statement
    returns: that statement's next run on each connection fails as a transient error
    (the work is retried), and runs as sent from then on."""
    with owner_engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS prepared_probe"))
        conn.execute(text("CREATE TABLE prepared_probe (id int PRIMARY KEY, n int)"))
        conn.execute(text("INSERT INTO prepared_probe VALUES (1, 41)"))
        conn.execute(text(f'GRANT SELECT ON prepared_probe TO "{single_pool.url.username}"'))
    probe = table("prepared_probe", column("id", Integer), column("n", Integer))
    read = prepared("test_probe", select(probe.c.n).where(probe.c.id == bindparam("id")))
    try:
        with single_pool.connect() as conn:
            assert conn.execute(read, {"id": 1}).scalar_one() == 41
        with owner_engine.begin() as conn:
            conn.execute(text("ALTER TABLE prepared_probe ALTER COLUMN n TYPE bigint"))
        with pytest.raises(DBAPIError) as raised, single_pool.connect() as conn:
            conn.execute(read, {"id": 1})
        assert is_transient(raised.value)
        with single_pool.connect() as conn:
            assert conn.execute(read, {"id": 1}).scalar_one() == 41
    finally:
        with owner_engine.begin() as conn:
            conn.execute(text("DROP TABLE prepared_probe"))
