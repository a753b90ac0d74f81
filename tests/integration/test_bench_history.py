"""The benchmark's history loader writes orders as the system leaves them: every table
consistent, nothing for the integrity check to repair."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, create_engine, text

from bench.history import CONSUMERS, load_history
from orders import events
from orders.events import Event
from tests.conftest import Servers, migrate

ORDERS, CUSTOMERS, PRODUCTS = 400, 5, 5


class Recorder:
    """A consumer under a real consumer's name that notes what it is given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.applied: list[Event] = []

    def apply(self, conn: Connection, batch: Sequence[Event]) -> None:
        self.applied += batch


@pytest.fixture(scope="module")
def loaded(servers: Servers) -> Iterator[Engine]:
    """A database of its own (the loader moves the consumers' checkpoints), with the
    bench's customers and products and a history loaded."""
    name = f"history_{uuid.uuid4().hex[:8]}"
    servers.postgres.create_database(name)
    owner_url = servers.postgres.url(name, role="owner")
    migrate(owner_url)
    engine = create_engine(owner_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO customers (id, name, credit_limit) "
                "SELECT 'C' || n, 'bench', 1000000 FROM generate_series(0, :k - 1) n"
            ),
            {"k": CUSTOMERS},
        )
        conn.execute(
            text(
                "INSERT INTO products (id, name, unit_price, on_hand) "
                "SELECT 'P' || n, 'bench', 2.5, 1000 FROM generate_series(0, :k - 1) n"
            ),
            {"k": PRODUCTS},
        )
    load_history(
        owner_url,
        ORDERS,
        customers=CUSTOMERS,
        products=PRODUCTS,
        admin_url=servers.postgres.url(name, role="admin"),
    )
    yield engine
    engine.dispose()


def test_every_table_gets_its_share(loaded: Engine) -> None:
    with loaded.connect() as conn:
        counts = {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()  # noqa: S608
            for table in (
                "orders",
                "order_lines",
                "order_events",
                "sagas",
                "saga_steps",
                "idempotency_keys",
                "consumer_positions",
            )
        }
    assert counts == {
        "orders": ORDERS,
        "order_lines": ORDERS * 3 // 2,
        "order_events": ORDERS * 2,
        "sagas": ORDERS,
        "saga_steps": ORDERS * 2,
        "idempotency_keys": ORDERS // 2,
        "consumer_positions": ORDERS * len(CONSUMERS),
    }


def test_orders_agree_with_their_lines_events_and_sagas(loaded: Engine) -> None:
    with loaded.connect() as conn:
        wrong_total = conn.execute(
            text(
                "SELECT count(*) FROM orders o WHERE total <> "
                "(SELECT sum(quantity * unit_price) FROM order_lines l WHERE l.order_id = o.id)"
            )
        ).scalar_one()
        logs = conn.execute(
            text(
                "SELECT o.status, array_agg(e.type ORDER BY e.seq) AS types, "
                "array_agg(e.seq ORDER BY e.seq) AS seqs, count(*) AS n "
                "FROM orders o JOIN order_events e ON e.order_id = o.id "
                "GROUP BY o.status, o.id"
            )
        ).all()
        sagas_off = conn.execute(
            text(
                "SELECT count(*) FROM orders o JOIN sagas s ON s.id = o.saga_id "
                "WHERE s.state <> o.status OR s.finished_at IS NULL "
                "OR (s.payload->>'amount')::numeric <> o.total"
            )
        ).scalar_one()
        credit_off = conn.execute(
            text(
                "SELECT count(*) FROM customers c WHERE credit_used <> coalesce((SELECT "
                "sum(total) FROM orders o WHERE o.customer_id = c.id "
                "AND status = 'CONFIRMED'), 0)"
            )
        ).scalar_one()
        placed = conn.execute(
            text("SELECT sum(orders_placed) FROM customer_order_summaries")
        ).scalar_one()
    assert wrong_total == 0
    assert sagas_off == 0
    assert credit_off == 0
    assert placed == ORDERS
    expected = {
        "CONFIRMED": ["OrderPlaced", "OrderConfirmed"],
        "CANCELLED": ["OrderPlaced", "OrderCancelled"],
    }
    assert {row.status for row in logs} == set(expected)
    assert all(row.types == expected[row.status] and row.seqs == [1, 2] for row in logs)
    assert len(logs) == ORDERS


def test_consumers_have_nothing_to_read_or_repair(loaded: Engine) -> None:
    with loaded.connect() as conn:
        newest = conn.execute(text("SELECT max(id) FROM order_events")).scalar_one()
        checkpoints: dict[str, int] = dict(
            conn.execute(text("SELECT consumer, last_id FROM consumer_checkpoints")).all()
        )
    assert checkpoints == dict.fromkeys(CONSUMERS, newest)
    for name in CONSUMERS:
        recorder = Recorder(name)
        tally = events.repair(loaded, recorder, sweep_rows=ORDERS * 2)
        assert tally.examined >= ORDERS  # the sweep went round every order
        assert recorder.applied == []
        assert tally.gaps == 0


def test_the_history_ids_are_time_ordered_as_the_system_makes_them(loaded: Engine) -> None:
    """UUID version 7 of the order's time (config.ids): sorted by id is sorted by time."""
    with loaded.connect() as conn:
        rows = conn.execute(
            text("SELECT o.id, o.saga_id, o.created_at FROM orders o ORDER BY o.id")
        ).all()
    assert {row.id.version for row in rows} == {7}
    assert {row.saga_id.version for row in rows} == {7}
    times = [row.created_at for row in rows]
    assert times == sorted(times)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for row in rows:
        assert row.id.int >> 80 == (row.created_at - epoch) // timedelta(milliseconds=1)
