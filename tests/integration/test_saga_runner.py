"""Each step takes effect once per saga; completion decides once and confirms or
compensates exactly what was reserved (real PostgreSQL, no broker)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from uuid import UUID

from sqlalchemy import Engine, select

from config import failpoints
from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from orders.tables import order_events, orders
from sagas import runner
from sagas.engine import SagaState, StepOutcome, StepStatus
from sagas.tables import saga_steps, sagas
from tests.fakes import RecordingLauncher
from tests.helpers import Credit, Stock, add_customer, add_product, credit_of, stock_of

SAGA = OrderSaga()
RETRY = timedelta(seconds=60)


def place(engine: Engine, customer: str, product: str, quantity: int):
    launcher = RecordingLauncher()
    cmd = PlaceOrder(customer, (OrderLine(product, quantity),), client="tests")
    accepted = services.place_order(engine, cmd, launcher)
    (start,) = launcher.launched
    return accepted, start


def run_both_steps(engine: Engine, saga_id: UUID, payload) -> list[StepOutcome]:
    return [
        runner.run_step(engine, SAGA, saga_id, step, payload)
        for step in (RESERVE_STOCK, RESERVE_CREDIT)
    ]


def order_row(engine: Engine, order_id: UUID):
    with engine.connect() as conn:
        return conn.execute(select(orders).where(orders.c.id == order_id)).one()


def events_of(engine: Engine, order_id: UUID) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                select(order_events.c.seq, order_events.c.type)
                .where(order_events.c.order_id == order_id)
                .order_by(order_events.c.seq)
            )
        ]


def ledger(engine: Engine, saga_id: UUID) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                select(saga_steps.c.step, saga_steps.c.status).where(
                    saga_steps.c.saga_id == saga_id
                )
            ).all()
        )


def test_a_confirmed_order_holds_exactly_its_stock_and_credit(engine: Engine) -> None:
    customer, product = (
        add_customer(engine, limit="100.00"),
        add_product(engine, on_hand=10, price="7.50"),
    )
    accepted, start = place(engine, customer, product, 4)

    outcomes = run_both_steps(engine, start.saga_id, start.payload)
    assert [o.status for o in outcomes] == [StepStatus.APPLIED, StepStatus.APPLIED]
    assert stock_of(engine, product) == Stock(on_hand=10, reserved=4)
    assert credit_of(engine, customer).reserved == Decimal("30.00")

    done = runner.complete(engine, SAGA, start.saga_id, retry_after=RETRY)
    assert done.decision is not None and done.decision.state is SagaState.CONFIRMED
    assert stock_of(engine, product) == Stock(on_hand=6, reserved=0)
    assert credit_of(engine, customer) == Credit(Decimal("100.00"), Decimal("30.00"), Decimal("0"))
    assert order_row(engine, accepted.order_id).status == "CONFIRMED"
    assert events_of(engine, accepted.order_id) == [(1, "OrderPlaced"), (2, "OrderConfirmed")]


def test_out_of_stock_cancels_and_releases_the_reserved_credit(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=1)
    accepted, start = place(engine, customer, product, 2)

    outcomes = run_both_steps(engine, start.saga_id, start.payload)
    assert outcomes[0] == StepOutcome(RESERVE_STOCK, StepStatus.REFUSED, "out_of_stock")
    runner.complete(engine, SAGA, start.saga_id, retry_after=RETRY)

    row = order_row(engine, accepted.order_id)
    assert (row.status, row.cancel_reason) == ("CANCELLED", "out_of_stock")
    assert credit_of(engine, customer) == Credit(Decimal("100.00"), Decimal("0"), Decimal("0"))
    assert stock_of(engine, product) == Stock(1, 0)
    assert ledger(engine, start.saga_id) == {
        RESERVE_STOCK: "REFUSED",
        RESERVE_CREDIT: "COMPENSATED",
    }


def test_over_the_credit_limit_cancels_and_releases_the_reserved_stock(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="5.00"), add_product(engine, on_hand=3)
    accepted, start = place(engine, customer, product, 1)  # 10.00 > 5.00

    run_both_steps(engine, start.saga_id, start.payload)
    runner.complete(engine, SAGA, start.saga_id, retry_after=RETRY)

    row = order_row(engine, accepted.order_id)
    assert (row.status, row.cancel_reason) == ("CANCELLED", "credit_limit_exceeded")
    assert stock_of(engine, product) == Stock(3, 0)
    assert credit_of(engine, customer).reserved == Decimal("0")
    assert events_of(engine, accepted.order_id) == [(1, "OrderPlaced"), (2, "OrderCancelled")]


def test_a_step_run_again_changes_nothing_and_returns_the_same_outcome(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=1)
    _, start = place(engine, customer, product, 1)

    first = run_both_steps(engine, start.saga_id, start.payload)
    again = run_both_steps(engine, start.saga_id, start.payload)
    assert again == first
    assert stock_of(engine, product) == Stock(1, 1)
    assert credit_of(engine, customer).reserved == Decimal("10.00")


def test_completing_twice_changes_nothing_the_second_time(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    accepted, start = place(engine, customer, product, 2)
    run_both_steps(engine, start.saga_id, start.payload)

    assert runner.complete(engine, SAGA, start.saga_id, retry_after=RETRY).decision is not None
    assert runner.complete(engine, SAGA, start.saga_id, retry_after=RETRY).decision is None
    assert stock_of(engine, product) == Stock(3, 0)
    assert credit_of(engine, customer).used == Decimal("20.00")
    assert events_of(engine, accepted.order_id) == [(1, "OrderPlaced"), (2, "OrderConfirmed")]
    with engine.connect() as conn:
        state = conn.execute(select(sagas.c.state).where(sagas.c.id == start.saga_id)).scalar()
    assert state == "CONFIRMED"


def test_a_step_redelivered_after_the_decision_changes_nothing(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=1)
    _, start = place(engine, customer, product, 2)  # refused: only 1 on hand
    run_both_steps(engine, start.saga_id, start.payload)
    runner.complete(engine, SAGA, start.saga_id, retry_after=RETRY)

    again = runner.run_step(engine, SAGA, start.saga_id, RESERVE_CREDIT, start.payload)
    assert again.status is StepStatus.COMPENSATED
    assert credit_of(engine, customer).reserved == Decimal("0")


# A step sent alone (the database join, or a stage of one step): the stage's last step
# decides it in its own transaction.


def run_alone(engine: Engine, saga_id: UUID, step: str, payload, saga=SAGA) -> runner.StepRun:
    return runner.run_step_and_complete(engine, saga, saga, saga_id, step, payload)


def saga_state(engine: Engine, saga_id: UUID) -> str:
    with engine.connect() as conn:
        return conn.execute(select(sagas.c.state).where(sagas.c.id == saga_id)).scalar_one()


def test_the_last_step_sent_alone_decides_the_saga_with_its_own_outcome(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    accepted, start = place(engine, customer, product, 2)

    first = run_alone(engine, start.saga_id, RESERVE_STOCK, start.payload)
    assert (first.outcome.status, first.completion, first.decided) == (
        StepStatus.APPLIED,
        None,
        True,  # nothing to attempt: the other step decides
    )
    assert order_row(engine, accepted.order_id).status == "PENDING"

    last = run_alone(engine, start.saga_id, RESERVE_CREDIT, start.payload)
    assert last.completion is not None and last.completion.decision is not None
    assert last.completion.decision.state is SagaState.CONFIRMED
    assert order_row(engine, accepted.order_id).status == "CONFIRMED"
    assert stock_of(engine, product) == Stock(3, 0)
    assert credit_of(engine, customer).used == Decimal("20.00")
    assert events_of(engine, accepted.order_id) == [(1, "OrderPlaced"), (2, "OrderConfirmed")]


def test_steps_sent_alone_finishing_together_decide_every_saga_once(engine: Engine) -> None:
    """Both steps of each saga run at once, on their own connections: the one that takes
    the saga's lock second sees the other's outcome and decides; none is left waiting
    for a sweeper, none decided twice."""
    customer, product = add_customer(engine, limit="1000.00"), add_product(engine, on_hand=100)
    started = [place(engine, customer, product, 1) for _ in range(20)]

    def race(start) -> list[runner.StepRun]:
        with ThreadPoolExecutor(2) as pool:
            runs = [
                pool.submit(run_alone, engine, start.saga_id, step, start.payload)
                for step in (RESERVE_STOCK, RESERVE_CREDIT)
            ]
            return [run.result(timeout=30) for run in runs]

    for accepted, start in started:
        runs = race(start)
        decided = [run for run in runs if run.completion is not None]
        assert len(decided) == 1 and all(run.decided for run in runs)
        assert order_row(engine, accepted.order_id).status == "CONFIRMED"
    assert stock_of(engine, product) == Stock(80, 0)
    assert credit_of(engine, customer).used == Decimal("200.00")


def test_a_step_sent_alone_after_the_saga_was_cancelled_changes_nothing(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    accepted, start = place(engine, customer, product, 2)
    runner.cancel(engine, SAGA, start.saga_id, "customer_cancelled", retry_after=lambda n: RETRY)

    late = run_alone(engine, start.saga_id, RESERVE_STOCK, start.payload)
    assert (late.outcome.status, late.completion, late.decided) == (
        StepStatus.ABORTED,
        None,
        False,  # a redelivery: the caller completes the stage in case a crash came between
    )
    assert stock_of(engine, product) == Stock(5, 0)
    assert order_row(engine, accepted.order_id).status == "CANCELLED"


class FailingReleaseAlone(OrderSaga):
    def compensate(self, step: str, conn, payload) -> None:
        raise RuntimeError("stock service unavailable")


def test_a_decision_that_fails_with_the_step_leaves_the_step_done_and_the_stage_to_complete(
    engine: Engine,
) -> None:
    """Deciding with the step never costs the step: the step commits alone, and the
    completion (with its own handling of a failed compensation) is the caller's."""
    customer, product = add_customer(engine, limit="5.00"), add_product(engine, on_hand=3)
    accepted, start = place(engine, customer, product, 1)  # 10.00 > 5.00: refused credit
    saga = FailingReleaseAlone()

    assert run_alone(engine, start.saga_id, RESERVE_STOCK, start.payload, saga).decided
    last = run_alone(engine, start.saga_id, RESERVE_CREDIT, start.payload, saga)
    assert (last.outcome.status, last.completion, last.decided) == (
        StepStatus.REFUSED,
        None,
        False,
    )
    assert ledger(engine, start.saga_id) == {RESERVE_STOCK: "APPLIED", RESERVE_CREDIT: "REFUSED"}
    assert saga_state(engine, start.saga_id) == "RUNNING"

    done = runner.complete(engine, saga, start.saga_id, retry_after=lambda n: RETRY)
    assert done.decision is not None and done.decision.state is SagaState.COMPENSATION_FAILED
    assert runner.complete(engine, SAGA, start.saga_id, retry_after=lambda n: RETRY).decision
    assert order_row(engine, accepted.order_id).status == "CANCELLED"
    assert stock_of(engine, product) == Stock(3, 0)


def test_two_sagas_of_one_customer_deciding_at_once_do_not_wait_for_each_other(
    engine: Engine, monkeypatch
) -> None:
    """X's last step holds the customer's credit row and must take the product's row to
    confirm; Y's last step holds the product's row and must take the credit row. Each
    waits for the other: a deadlock, which PostgreSQL breaks after ``deadlock_timeout``
    by failing one of them. That step gives way (no error): it commits alone and its
    completion decides after it. Both orders are confirmed, nothing is counted twice."""
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    (x, x_start), (y, y_start) = (place(engine, customer, product, 1) for _ in range(2))
    assert run_alone(engine, x_start.saga_id, RESERVE_STOCK, x_start.payload).decided
    assert run_alone(engine, y_start.saga_id, RESERVE_CREDIT, y_start.payload).decided
    # Both last steps hold their effect's row a while before deciding.
    monkeypatch.setattr(failpoints, "_armed", failpoints._parse("step.before_commit=sleep:1"))

    with ThreadPoolExecutor(2) as pool:
        x_last = pool.submit(run_alone, engine, x_start.saga_id, RESERVE_CREDIT, x_start.payload)
        y_last = pool.submit(run_alone, engine, y_start.saga_id, RESERVE_STOCK, y_start.payload)
        runs = [x_last.result(timeout=30), y_last.result(timeout=30)]

    # A step that gave way left its completion to run after it (the worker's join;
    # here, by hand).
    assert [run.outcome.status for run in runs] == [StepStatus.APPLIED] * 2
    gave_way = [
        start for run, start in zip(runs, (x_start, y_start), strict=True) if not run.decided
    ]
    assert len(gave_way) == 1, "PostgreSQL fails one of the two"
    for start in gave_way:
        assert runner.complete(engine, SAGA, start.saga_id, retry_after=lambda n: RETRY).decision
    assert [order_row(engine, o.order_id).status for o in (x, y)] == ["CONFIRMED"] * 2
    assert stock_of(engine, product) == Stock(3, 0)
    assert credit_of(engine, customer).used == Decimal("20.00")
