"""Every fault the database can throw at a task, produced for real, is classified in one
place (``config.faults.is_transient``): the infrastructure's faults are retried, a broken
rule is not. And every engine carries the statement, lock and idle timeouts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest
from sqlalchemy import Connection, Engine, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError, PendingRollbackError

from config.database import make_engine, transaction
from config.faults import is_transient
from config.settings import Settings
from orders.tables import products
from tests.helpers import add_product


@pytest.fixture
def own(settings: Settings) -> Iterator[Callable[..., Engine]]:
    """Engines of this test's own (closed after it), with settings changed as asked."""
    made: list[Engine] = []

    def make(**changes: float) -> Engine:
        made.append(make_engine(replace(settings, **changes), application_name="faults"))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def sqlstate(exc: BaseException) -> str | None:
    return getattr(getattr(exc, "orig", None), "pgcode", None)


def lock_row(engine: Engine, product: str) -> tuple[Connection, Callable[[], None]]:
    """Hold a row lock on ``product`` in an open transaction; return a release."""
    conn = engine.connect()
    tx = conn.begin()
    conn.execute(text("SELECT 1 FROM products WHERE id = :p FOR UPDATE"), {"p": product})

    def release() -> None:
        tx.rollback()
        conn.close()

    return conn, release


def test_a_backend_terminated_mid_transaction_is_a_transient_error_that_passes(
    engine: Engine, own: Callable[..., Engine]
) -> None:
    victim = own()
    with pytest.raises(DBAPIError) as raised, transaction(victim) as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.begin() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.execute(text("SELECT 1"))
    # The connection's own error leaves, not a PendingRollbackError hiding it.
    assert type(raised.value).__name__ == "OperationalError"
    assert is_transient(raised.value)
    with transaction(victim) as conn:  # the pool dropped the dead connection
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_what_sqlalchemy_raises_after_a_connection_broke_mid_transaction_is_transient(
    engine: Engine, own: Callable[..., Engine]
) -> None:
    conn = own().connect()
    tx = conn.begin()
    try:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with engine.begin() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError):
            conn.execute(text("SELECT 1"))
        with pytest.raises(PendingRollbackError) as raised:
            conn.execute(text("SELECT 1"))  # the broken transaction used again
    finally:
        tx.rollback()
        conn.close()
    assert is_transient(raised.value)


def test_a_deadlock_is_transient(engine: Engine, own: Callable[..., Engine]) -> None:
    a, b = add_product(engine, on_hand=1), add_product(engine, on_hand=1)
    first, second = own(), own()
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def cross(engine_: Engine, mine: str, theirs: str) -> None:
        try:
            with engine_.begin() as conn:
                conn.execute(update(products).where(products.c.id == mine).values(on_hand=2))
                barrier.wait(5)
                conn.execute(update(products).where(products.c.id == theirs).values(on_hand=2))
        except DBAPIError as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=cross, args=(first, a, b)),
        threading.Thread(target=cross, args=(second, b, a)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [sqlstate(e) for e in errors] == ["40P01"]
    assert is_transient(errors[0])


def test_a_serialization_failure_is_transient(engine: Engine, own: Callable[..., Engine]) -> None:
    product = add_product(engine, on_hand=5)
    reader = own().connect().execution_options(isolation_level="REPEATABLE READ")
    try:
        tx = reader.begin()
        reader.execute(text("SELECT on_hand FROM products WHERE id = :p"), {"p": product})
        with engine.begin() as conn:
            conn.execute(update(products).where(products.c.id == product).values(on_hand=4))
        with pytest.raises(DBAPIError) as raised:
            reader.execute(update(products).where(products.c.id == product).values(on_hand=3))
        tx.rollback()
    finally:
        reader.close()
    assert sqlstate(raised.value) == "40001"
    assert is_transient(raised.value)


def test_the_lock_timeout_of_the_settings_ends_a_wait_transiently(
    engine: Engine, own: Callable[..., Engine]
) -> None:
    product = add_product(engine, on_hand=5)
    _, release = lock_row(engine, product)
    try:
        waiting = own(db_lock_timeout_seconds=0.2)
        with pytest.raises(DBAPIError) as raised, transaction(waiting) as conn:
            conn.execute(update(products).where(products.c.id == product).values(on_hand=1))
    finally:
        release()
    assert sqlstate(raised.value) == "55P03"
    assert is_transient(raised.value)


def test_the_statement_timeout_of_the_settings_ends_a_statement_transiently(
    own: Callable[..., Engine],
) -> None:
    impatient = own(db_statement_timeout_seconds=0.2)
    with pytest.raises(DBAPIError) as raised, transaction(impatient) as conn:
        conn.execute(text("SELECT pg_sleep(5)"))
    assert sqlstate(raised.value) == "57014"
    assert is_transient(raised.value)


def test_a_session_left_idle_in_its_transaction_is_ended_by_the_server(
    engine: Engine, own: Callable[..., Engine]
) -> None:
    product = add_product(engine, on_hand=5)
    idle = own(db_idle_in_transaction_seconds=0.3)
    with pytest.raises(DBAPIError) as raised, idle.begin() as conn:
        conn.execute(text("SELECT 1 FROM products WHERE id = :p FOR UPDATE"), {"p": product})
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        _wait_until_gone(engine, pid)
        conn.execute(text("SELECT 1"))
    assert is_transient(raised.value)
    # Its lock went with it.
    with transaction(own(db_lock_timeout_seconds=1)) as conn:
        conn.execute(update(products).where(products.c.id == product).values(on_hand=1))


def _wait_until_gone(engine: Engine, pid: int) -> None:
    from tests.helpers import wait_for

    def gone() -> bool:
        with engine.connect() as conn:
            query = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            return conn.execute(query, {"pid": pid}).scalar_one() == 0

    wait_for("the server to end the idle transaction", gone, timeout=10)


def test_a_read_only_transaction_during_a_failover_is_transient(engine: Engine) -> None:
    product = add_product(engine, on_hand=5)
    with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
        conn.execute(text("SET TRANSACTION READ ONLY"))
        conn.execute(update(products).where(products.c.id == product).values(on_hand=1))
    assert sqlstate(raised.value) == "25006"
    assert is_transient(raised.value)


def test_a_broken_rule_is_not_transient(engine: Engine) -> None:
    product = add_product(engine, on_hand=5)
    with pytest.raises(IntegrityError) as raised, transaction(engine) as conn:
        conn.execute(update(products).where(products.c.id == product).values(on_hand=-1))
    assert not is_transient(raised.value)


def test_the_server_refusing_connections_is_transient(own: Callable[..., Engine]) -> None:
    from scripts.services import free_port

    nowhere = own(database_url=f"postgresql+psycopg2://orders@127.0.0.1:{free_port()}/orders")
    with pytest.raises(DBAPIError) as raised, transaction(nowhere):
        pass
    assert is_transient(raised.value)
