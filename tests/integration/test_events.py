"""Order events are numbered 1..n per order, and consumers apply each once, in order,
through duplicates, reordering and holes, with the integrity check filling the holes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

import pytest
from sqlalchemy import Connection, Engine, select, update

from orders import events, queries, services
from orders.domain import OrderLine, PlaceOrder
from orders.events import Event
from orders.projections import CustomerSummaries
from orders.tables import order_events, orders
from sagas.definition import SagaStart
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product


class Recorder:
    """A consumer that notes what it is given, under a name of its own."""

    def __init__(self, watched: set[UUID]) -> None:
        self.name = f"test-{uuid.uuid4().hex[:12]}"
        self.watched = watched
        self.applied: list[tuple[UUID, int]] = []

    def apply(self, conn: Connection, batch: Sequence[Event]) -> None:
        self.applied += [(e.order_id, e.seq) for e in batch if e.order_id in self.watched]


def place(engine: Engine, customer: str, product: str, quantity: int = 1) -> UUID:
    cmd = PlaceOrder(customer, (OrderLine(product, quantity),), client="tests")
    return services.place_order(engine, cmd, RecordingLauncher()).order_id


def cancelled_after_a_failed_compensation(engine: Engine, order_id: UUID) -> None:
    with engine.begin() as conn:
        services.mark_compensation_failed(conn, order_id, "out_of_stock", "db down")
    with engine.begin() as conn:
        services.cancel_order(conn, order_id, "out_of_stock")


def log_of(engine: Engine, *order_ids: UUID) -> dict[UUID, list[Event]]:
    e = order_events.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(e.id, e.order_id, e.seq, e.type, e.payload, e.occurred_at)
            .where(e.order_id.in_(order_ids))
            .order_by(e.order_id, e.seq)
        ).all()
    found: dict[UUID, list[Event]] = {order_id: [] for order_id in order_ids}
    for row in rows:
        found[row.order_id].append(Event(*row))
    return found


def test_every_change_appends_the_next_event_of_its_order(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    first, second = place(engine, customer, product), place(engine, customer, product)
    cancelled_after_a_failed_compensation(engine, first)

    log = log_of(engine, first, second)
    assert [(e.seq, e.type) for e in log[first]] == [
        (1, "OrderPlaced"),
        (2, "OrderCompensationFailed"),
        (3, "OrderCancelled"),
    ]
    assert [e.seq for e in log[second]] == [1]
    # The feed numbers them in the order they were written.
    assert log[first][0].id < log[second][0].id < log[first][1].id < log[first][2].id
    with engine.connect() as conn:
        assert conn.execute(select(orders.c.version).where(orders.c.id == first)).scalar() == 3


def test_duplicates_reordering_and_a_hole_end_with_each_event_applied_once_in_order(
    engine: Engine,
) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    a, b = place(engine, customer, product), place(engine, customer, product, 2)
    cancelled_after_a_failed_compensation(engine, a)  # a: 1, 2, 3
    with engine.begin() as conn:
        services.cancel_order(conn, b, "out_of_stock")  # b: 1, 2
    log = log_of(engine, a, b)
    a1, _, a3 = log[a]
    b1, b2 = log[b]
    recorder, summaries = Recorder({a, b}), CustomerSummaries()

    for consumer in (recorder, summaries):
        # a1 twice, b2 before b1, and a3 without a2 (a hole).
        first = events.deliver(engine, consumer, [a1, a1, b2, b1, a3])
        assert (first.applied, first.duplicates, first.gaps) == (3, 1, 1)
        assert [e.seq for e in first.blocked] == [3]
        again = events.deliver(engine, consumer, [b1, b2, a1])  # all seen already
        assert (again.applied, again.duplicates) == (0, 3)

    assert recorder.applied == [(a, 1), (b, 1), (b, 2)]
    summary = queries.customer_summary(engine, customer)
    assert summary is not None
    assert (summary.orders_placed, summary.orders_cancelled) == (2, 1)  # a3 not yet

    # The integrity check finds a behind its log and applies the missing range.
    for consumer in (recorder, summaries):
        repaired = events.repair(engine, consumer, hold=0)
        assert repaired.applied >= 2 and repaired.gaps >= 1
    assert recorder.applied == [(a, 1), (b, 1), (b, 2), (a, 2), (a, 3)]
    summary = queries.customer_summary(engine, customer)
    assert summary is not None
    assert (
        summary.orders_placed,
        summary.orders_confirmed,
        summary.orders_cancelled,
        summary.placed_total,
        summary.confirmed_total,
    ) == (2, 0, 2, Decimal("30.00"), Decimal("0"))
    # Nothing left behind among the recent orders (the sweep, left out, would find the
    # older orders of the session, new to this consumer).
    assert events.repair(engine, recorder, hold=0, sweep_rows=0).applied == 0


class HeldOpen(RecordingLauncher):
    """Keeps the order's transaction open (its event written, not committed) until told."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.release = threading.Event(), threading.Event()

    def stage(self, conn: Connection, start: SagaStart) -> None:
        super().stage(conn, start)
        self.inside.set()
        assert self.release.wait(30)


@contextmanager
def order_held_open(engine: Engine, customer: str, product: str) -> Iterator[list[UUID]]:
    """An order whose transaction has written its event (taken its id) and stays open
    inside the block; after the block it commits, and the list holds its id."""
    held = HeldOpen()
    slow_id: list[UUID] = []
    slow = threading.Thread(
        target=lambda: slow_id.append(
            services.place_order(
                engine, PlaceOrder(customer, (OrderLine(product, 1),), client="t"), held
            ).order_id
        )
    )
    slow.start()
    try:
        assert held.inside.wait(10)
        yield slow_id
    finally:
        held.release.set()
        slow.join(10)


def test_the_feed_does_not_pass_an_event_whose_transaction_has_not_committed(
    engine: Engine,
) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    recorder = Recorder(set())
    events.consume(engine, recorder, limit=1_000_000, hold=0)  # the log so far

    with order_held_open(engine, customer, product) as slow_id:
        fast = place(engine, customer, product)  # written after, committed first
        recorder.watched.add(fast)
        events.consume(engine, recorder, hold=60)
        assert recorder.applied == [(fast, 1)]
    (late,) = slow_id
    recorder.watched.add(late)
    events.consume(engine, recorder, hold=60)  # the checkpoint waited below it
    assert recorder.applied == [(fast, 1), (late, 1)]
    assert events.consume(engine, recorder, hold=60).applied == 0


def test_a_customers_summary_adds_up_orders_of_the_largest_size(engine: Engine) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=1000, price="9999999999.99")
    largest = [place(engine, customer, product, 100) for _ in range(3)]
    summaries = CustomerSummaries()
    log = log_of(engine, *largest)
    events.deliver(engine, summaries, log[largest[0]])
    done = events.deliver(engine, summaries, [e for order in log.values() for e in order])
    assert done.applied == 2 and done.duplicates == 1
    summary = queries.customer_summary(engine, customer)
    assert summary is not None
    assert (summary.orders_placed, summary.placed_total) == (3, Decimal("2999999999997.00"))


def test_a_hole_is_held_from_when_the_consumer_first_saw_it_not_from_its_neighbours_clock(
    engine: Engine,
) -> None:
    """A transaction that waited (a lock, a slow client) before writing its event leaves
    a hole next to events stamped earlier: the consumer still holds the hole for ``hold``
    from when it first saw it."""
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    recorder = Recorder(set())
    events.consume(engine, recorder, limit=1_000_000, hold=0)  # the log so far

    seen: dict[int, datetime] = {}
    with order_held_open(engine, customer, product) as slow_id:
        fast = place(engine, customer, product)  # after the hole, stamped an hour ago
        recorder.watched.add(fast)
        with engine.begin() as conn:
            conn.execute(
                update(order_events)
                .where(order_events.c.order_id == fast)
                .values(occurred_at=datetime.now(UTC) - timedelta(hours=1))
            )
        first = events.consume(engine, recorder, hold=0.5, seen=seen)
        assert recorder.applied == [(fast, 1)]
        assert first.checkpoint is not None
        assert first.checkpoint < log_of(engine, fast)[fast][0].id  # held below the hole
        # Polled again and again within the hold, the checkpoint stays below the hole.
        for _ in range(3):
            assert events.consume(engine, recorder, hold=60, seen=seen).checkpoint == (
                first.checkpoint
            )
        # Past the hold it moves on (the integrity check then covers what it passed).
        deadline = time.monotonic() + 10
        while events.consume(engine, recorder, hold=0.5, seen=seen).checkpoint == (
            first.checkpoint
        ):
            assert time.monotonic() < deadline, "the checkpoint never passed the hole"
            time.sleep(0.05)
    (late,) = slow_id
    recorder.watched.add(late)
    events.consume(engine, recorder, hold=60, seen=seen)
    assert (late, 1) not in recorder.applied  # the feed passed it
    events.repair(engine, recorder, hold=0)
    assert recorder.applied == [(fast, 1), (late, 1)]


def test_holes_seen_together_are_waited_for_together(engine: Engine) -> None:
    """Two holes a few ids apart, next to events stamped long ago: both are held from the
    pass that first saw them, so the checkpoint passes both after one ``hold``, not one
    ``hold`` per hole."""
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=9)
    recorder = Recorder(set())
    start = events.consume(engine, recorder, limit=1_000_000, hold=0).checkpoint
    seen: dict[int, datetime] = {}
    with order_held_open(engine, customer, product):
        first = place(engine, customer, product)
        with order_held_open(engine, customer, product):
            second = place(engine, customer, product)
            with engine.begin() as conn:
                conn.execute(
                    update(order_events)
                    .where(order_events.c.order_id.in_([first, second]))
                    .values(occurred_at=datetime.now(UTC) - timedelta(hours=1))
                )
            last = log_of(engine, second)[second][0].id
            assert events.consume(engine, recorder, hold=0.5, seen=seen).checkpoint == start
            deadline = time.monotonic() + 10
            while (moved := events.consume(engine, recorder, hold=0.5, seen=seen)).checkpoint == (
                start
            ):
                assert time.monotonic() < deadline, "the checkpoint never passed the holes"
                time.sleep(0.05)
            assert moved.checkpoint == last  # both holes at once
            assert seen == {}


class Broken(Recorder):
    """A consumer whose effect cannot be applied (its cache is down, say)."""

    def apply(self, conn: Connection, batch: Sequence[Event]) -> None:
        raise ConnectionError("cache down")


def test_one_consumer_failing_its_integrity_check_does_not_keep_the_others_behind(
    engine: Engine,
) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    behind = place(engine, customer, product)
    recorder = Recorder({behind})
    with pytest.raises(events.CheckFailed, match=r"check failed for test-"):
        events.check_all(engine, [Broken(set()), recorder], hold=0)
    assert recorder.applied == [(behind, 1)]
