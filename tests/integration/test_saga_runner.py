"""Each step takes effect once per saga; completion decides once and confirms or
compensates exactly what was reserved (real PostgreSQL, no broker)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from uuid import UUID

from sqlalchemy import Engine, select

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
