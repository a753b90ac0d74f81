"""The events integrity check costs what changed recently, not the history, and still
finds an event a consumer missed, in a recent order at once and in an old one within a
round of its sweep."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import Connection, Engine, event, func, select, text

from orders import events, services
from orders.domain import OrderLine, PlaceOrder
from orders.events import Event
from orders.tables import orders
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product

#: Old orders loaded first; the second measure has ten times as many.
HISTORY = 2_000


class Recorder:
    """A consumer that notes what it is given, under a name of its own."""

    def __init__(self) -> None:
        self.name = f"test-{uuid.uuid4().hex[:12]}"
        self.applied: list[tuple[UUID, int]] = []

    def apply(self, conn: Connection, batch: Sequence[Event]) -> None:
        self.applied += [(e.order_id, e.seq) for e in batch]


def add_history(owner_engine: Engine, customer: str, count: int) -> None:
    """``count`` confirmed orders changed a month ago, each with its OrderPlaced event
    (written in SQL: fast), and the planner's statistics brought up to date."""
    with owner_engine.begin() as conn:
        conn.execute(
            text(
                """
                WITH made AS (
                    INSERT INTO orders (id, customer_id, saga_id, status, total, version,
                                        created_at, updated_at)
                    SELECT gen_random_uuid(), :customer, gen_random_uuid(), 'CONFIRMED', 10, 1,
                           now() - interval '30 days' - g * interval '1 second',
                           now() - interval '30 days' - g * interval '1 second'
                      FROM generate_series(1, :count) AS g
                    RETURNING id, created_at)
                INSERT INTO order_events (order_id, seq, type, payload, occurred_at, placed_at)
                SELECT id, 1, 'OrderPlaced', '{}', created_at, created_at FROM made
                """
            ),
            {"customer": customer, "count": count},
        )
    with owner_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE orders"))


def caught_up(engine: Engine, consumer: str) -> None:
    """The consumer has applied every event of every order."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO consumer_positions (consumer, order_id, last_seq)"
                " SELECT :consumer, id, version FROM orders"
                " ON CONFLICT (consumer, order_id) DO UPDATE SET last_seq = excluded.last_seq"
            ),
            {"consumer": consumer},
        )


def missed(engine: Engine, consumer: str, order_id: UUID, position: int) -> None:
    """The consumer's position of the order stays at ``position``: it missed the rest."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE consumer_positions SET last_seq = :position"
                " WHERE consumer = :consumer AND order_id = :order_id"
            ),
            {"consumer": consumer, "order_id": order_id, "position": position},
        )


@pytest.fixture(scope="module")
def customer(engine: Engine, owner_engine: Engine) -> str:
    """A customer with HISTORY old orders."""
    customer = add_customer(engine, limit="1000000.00")
    add_history(owner_engine, customer, HISTORY)
    return customer


def test_a_missed_event_is_found_in_a_recent_order_at_once_and_in_an_old_one_by_the_sweep(
    engine: Engine, customer: str
) -> None:
    product = add_product(engine, on_hand=5)
    placed = services.place_order(
        engine, PlaceOrder(customer, (OrderLine(product, 1),), client="tests"), RecordingLauncher()
    ).order_id
    with engine.begin() as conn:
        services.cancel_order(conn, placed, "out_of_stock")  # seq 2
    with engine.connect() as conn:
        old = conn.execute(
            select(orders.c.id)
            .where(orders.c.customer_id == customer, orders.c.version == 1)
            .order_by(orders.c.updated_at)
            .limit(1)
        ).scalar_one()
        every_order = conn.execute(select(func.count()).select_from(orders)).scalar_one()
    recorder = Recorder()
    caught_up(engine, recorder.name)
    missed(engine, recorder.name, placed, 1)  # the feed passed OrderCancelled by
    missed(engine, recorder.name, old, 0)  # ... and, long ago, an old order's only event

    # The pass over recent changes finds the recent order's missing event at once.
    first = events.repair(engine, recorder, hold=0, sweep_rows=0)
    assert recorder.applied == [(placed, 2)]
    assert (first.applied, first.gaps) == (1, 1)

    # The old order changed long before any pass: the sweep round all orders finds it.
    rows = 500
    for _ in range(math.ceil(every_order / rows) + 1):
        if (old, 1) in recorder.applied:
            break
        events.repair(engine, recorder, hold=0, sweep_rows=rows)
    assert recorder.applied == [(placed, 2), (old, 1)]


def test_a_runs_work_does_not_grow_with_the_history(
    engine: Engine, owner_engine: Engine, customer: str
) -> None:
    """Measured in rows of ``orders`` PostgreSQL visits (EXPLAIN ANALYZE of the very
    statements a run sends), with HISTORY old orders and then ten times as many."""
    recorder = Recorder()
    caught_up(engine, recorder.name)
    events.repair(engine, recorder, hold=0, sweep_rows=0)  # the first pass

    with statements_of(engine) as sent:
        events.repair(engine, recorder, hold=0, sweep_rows=0)
    before = orders_visited(engine, sent)

    add_history(owner_engine, customer, 9 * HISTORY)
    with statements_of(engine) as sent:
        events.repair(engine, recorder, hold=0, sweep_rows=0)
    after = orders_visited(engine, sent)
    assert after <= before < HISTORY, (before, after)

    # The sweep looks at its batch, however many orders there are.
    rows = 300
    with statements_of(engine) as sent:
        swept = events.repair(engine, recorder, hold=0, sweep_rows=rows)
    assert swept.examined <= after + rows
    assert orders_visited(engine, sent) <= after + 2 * rows


@contextmanager
def statements_of(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The statements that read ``orders``, as sent on ``engine`` inside the block."""
    sent: list[tuple[str, Any]] = []

    def note(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM orders" in statement:
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", note)


def orders_visited(engine: Engine, sent: list[tuple[str, Any]]) -> int:
    """Rows of ``orders`` the statements read, by their plans run again; none may read
    all of ``orders`` or of ``consumer_positions``."""
    visited = 0
    with engine.connect() as conn:
        for statement, parameters in sent:
            raw = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
            ).scalar_one()
            plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
            for node in _nodes(plan):
                if node.get("Relation Name") not in ("orders", "consumer_positions"):
                    continue
                assert node["Node Type"] != "Seq Scan", statement
                if node["Relation Name"] != "orders":
                    continue
                read = node["Actual Rows"] + node.get("Rows Removed by Filter", 0)
                visited += read * node["Actual Loops"]
        conn.rollback()
    return visited


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)
