"""Nothing stays unfinished: sagas that lost messages, steps or their completion are
finished from PostgreSQL; a failed compensation is kept visible and retried."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from celery import Celery
from redis import Redis
from sqlalchemy import Connection, Engine, select, update

from config import names
from config.settings import Settings
from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from orders.tables import order_events, orders
from sagas import runner
from sagas.engine import SagaState, StepStatus
from sagas.recovery import RecoveryPolicy, sweep_overdue
from sagas.registry import SagaRegistry
from sagas.store import record_step
from sagas.tables import saga_steps, sagas
from tests.fakes import RecordingLauncher
from tests.helpers import Credit, Stock, add_customer, add_product, credit_of, stock_of
from workers.celery_app import create_celery

SAGA = OrderSaga()
POLICY = RecoveryPolicy(
    deadline=timedelta(seconds=30),
    timeout=timedelta(hours=1),
    redrive_max=timedelta(seconds=100),
    recheck=timedelta(seconds=5),
    compensation_retry=timedelta(seconds=60),
    compensation_retry_max=timedelta(seconds=100),
    compensation_max_attempts=3,
)
RETRY = POLICY.compensation_wait
SAGAS = SagaRegistry([SAGA])


@pytest.fixture
def redis(settings: Settings, servers: Any) -> Iterator[Redis]:
    client = Redis.from_url(servers.redis.url(6))
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def publisher(settings: Settings, servers: Any, redis: Redis) -> Celery:
    return create_celery(
        replace(settings, broker_url=servers.redis.url(6), result_backend_url=servers.redis.url(7)),
        publisher=True,
    )


def accept(engine: Engine, *, limit: str = "100.00") -> dict[str, Any]:
    """An accepted order of 2 units at 10.00 whose saga has not run yet."""
    customer, product = add_customer(engine, limit=limit), add_product(engine, on_hand=5)
    launcher = RecordingLauncher()
    cmd = PlaceOrder(customer, (OrderLine(product, 2),), client="tests")
    accepted = services.place_order(engine, cmd, launcher)
    (start,) = launcher.launched
    return {
        "customer": customer,
        "product": product,
        "order_id": accepted.order_id,
        "saga_id": start.saga_id,
        "payload": start.payload,
    }


@pytest.fixture
def order(engine: Engine) -> dict[str, Any]:
    return accept(engine)


def run(engine: Engine, order: dict[str, Any], step: str, saga: Any = SAGA) -> Any:
    return runner.run_step(engine, saga, order["saga_id"], step, order["payload"])


def overdue(engine: Engine, saga_id: UUID) -> None:
    """Make the saga overdue, and it alone: sagas other tests left unfinished in the
    shared database wait an hour more (their deadlines may have passed meanwhile)."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            update(sagas)
            .where(sagas.c.id != saga_id, sagas.c.deadline_at < now + timedelta(minutes=5))
            .where(sagas.c.state.in_(["RUNNING", "COMPENSATION_FAILED"]))
            .values(deadline_at=now + timedelta(hours=1))
        )
        conn.execute(
            update(sagas)
            .where(sagas.c.id == saga_id)
            .values(deadline_at=now - timedelta(seconds=1))
        )


def timed_out(engine: Engine, saga_id: UUID) -> None:
    """Accepted longer ago than the business timeout, and overdue (alone)."""
    overdue(engine, saga_id)
    with engine.begin() as conn:
        conn.execute(
            update(sagas)
            .where(sagas.c.id == saga_id)
            .values(created_at=datetime.now(UTC) - POLICY.timeout - timedelta(seconds=1))
        )


def waits(row: Any, expected: timedelta) -> bool:
    """Whether the saga's next look is ``expected`` from now (give or take a second)."""
    left = row.deadline_at - datetime.now(UTC)
    return expected - timedelta(seconds=2) < left <= expected


def saga_row(engine: Engine, saga_id: UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(sagas).where(sagas.c.id == saga_id)).one()


def order_row(engine: Engine, order_id: UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(orders).where(orders.c.id == order_id)).one()


def event_types(engine: Engine, order_id: UUID) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(order_events.c.type)
                .where(order_events.c.order_id == order_id)
                .order_by(order_events.c.seq)
            ).scalars()
        )


def ledger(engine: Engine, saga_id: UUID) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(
            conn.execute(
                select(saga_steps.c.step, saga_steps.c.status).where(
                    saga_steps.c.saga_id == saga_id
                )
            ).all()
        )


def test_a_completion_cannot_decide_while_a_step_has_no_outcome(
    engine: Engine, order: dict[str, Any]
) -> None:
    run(engine, order, RESERVE_STOCK)
    with pytest.raises(runner.StepsPending):
        runner.complete(engine, SAGA, order["saga_id"], retry_after=RETRY)
    assert saga_row(engine, order["saga_id"]).state == "RUNNING"


def test_an_aborted_step_that_arrives_late_does_nothing(
    engine: Engine, order: dict[str, Any]
) -> None:
    aborted = runner.abort_step(engine, order["saga_id"], RESERVE_STOCK, "step_failed")
    assert aborted.status is StepStatus.ABORTED
    late = run(engine, order, RESERVE_STOCK)
    assert late == aborted
    assert stock_of(engine, order["product"]) == Stock(5, 0)


def test_aborting_a_step_that_already_applied_keeps_its_outcome(
    engine: Engine, order: dict[str, Any]
) -> None:
    run(engine, order, RESERVE_STOCK)
    kept = runner.abort_step(engine, order["saga_id"], RESERVE_STOCK, "step_failed")
    assert kept.status is StepStatus.APPLIED


def test_the_sweeper_redrives_a_lost_saga_waiting_longer_each_time(
    engine: Engine, order: dict[str, Any], publisher: Celery, redis: Redis
) -> None:
    run(engine, order, RESERVE_STOCK)  # the credit step was lost with its message
    overdue(engine, order["saga_id"])

    report = sweep_overdue(engine, publisher, SAGAS, POLICY)
    assert (report.redriven, report.completed) == (1, 0)
    assert redis.llen(names.SAGA_QUEUE) == 2  # the chord, sent again
    row = saga_row(engine, order["saga_id"])
    assert (row.state, row.redrives) == ("RUNNING", 1)
    assert waits(row, timedelta(seconds=60))

    for redrives, wait in ((2, 100), (3, 100)):  # lost again: still redriven, capped wait
        overdue(engine, order["saga_id"])
        report = sweep_overdue(engine, publisher, SAGAS, POLICY)
        assert (report.redriven, report.completed) == (1, 0)
        row = saga_row(engine, order["saga_id"])
        assert (row.state, row.redrives) == ("RUNNING", redrives)
        assert waits(row, timedelta(seconds=wait))
    assert order_row(engine, order["order_id"]).status == "PENDING"


def test_a_saga_waits_unrefused_while_no_worker_consumes_its_lane(
    engine: Engine, order: dict[str, Any], publisher: Celery, redis: Redis
) -> None:
    overdue(engine, order["saga_id"])

    report = sweep_overdue(engine, publisher, SAGAS, POLICY, lane_ready=lambda: False)
    assert (report.waiting, report.redriven, report.completed) == (1, 0, 0)
    assert redis.llen(names.SAGA_QUEUE) == 0  # nothing piles up in the queue
    row = saga_row(engine, order["saga_id"])
    assert (row.state, row.redrives) == ("RUNNING", 0)
    assert waits(row, POLICY.recheck)  # looked at again soon: redriven once workers are back
    assert order_row(engine, order["order_id"]).status == "PENDING"


def test_a_saga_past_its_business_timeout_is_cancelled_and_released(
    engine: Engine, order: dict[str, Any], publisher: Celery, redis: Redis
) -> None:
    run(engine, order, RESERVE_STOCK)
    timed_out(engine, order["saga_id"])

    report = sweep_overdue(engine, publisher, SAGAS, POLICY, lane_ready=lambda: False)
    assert (report.redriven, report.completed) == (0, 1)
    row = order_row(engine, order["order_id"])
    assert (row.status, row.cancel_reason) == ("CANCELLED", "timed_out")
    assert stock_of(engine, order["product"]) == Stock(5, 0)
    assert ledger(engine, order["saga_id"]) == {
        RESERVE_STOCK: "COMPENSATED",
        RESERVE_CREDIT: "ABORTED",
    }
    # The lost step, delivered at last, changes nothing.
    assert run(engine, order, RESERVE_CREDIT).status is StepStatus.ABORTED
    assert credit_of(engine, order["customer"]).reserved == Decimal("0")


def test_the_sweeper_completes_a_saga_whose_completion_was_lost(
    engine: Engine, order: dict[str, Any], publisher: Celery, redis: Redis
) -> None:
    run(engine, order, RESERVE_STOCK)
    run(engine, order, RESERVE_CREDIT)
    overdue(engine, order["saga_id"])

    report = sweep_overdue(engine, publisher, SAGAS, POLICY)
    assert (report.redriven, report.completed) == (0, 1)
    assert order_row(engine, order["order_id"]).status == "CONFIRMED"
    assert stock_of(engine, order["product"]) == Stock(3, 0)
    assert redis.llen(names.SAGA_QUEUE) == 0


def test_sweepers_racing_on_one_saga_compensate_it_once(
    engine: Engine, order: dict[str, Any], publisher: Celery
) -> None:
    run(engine, order, RESERVE_CREDIT)
    timed_out(engine, order["saga_id"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        reports = list(
            pool.map(lambda _: sweep_overdue(engine, publisher, SAGAS, POLICY), range(4))
        )
    assert sum(r.completed for r in reports) == 1
    assert credit_of(engine, order["customer"]) == Credit(
        Decimal("100.00"), Decimal("0"), Decimal("0")
    )
    assert event_types(engine, order["order_id"]) == ["OrderPlaced", "OrderCancelled"]


def test_a_step_committing_while_the_sweeper_aborts_it_is_compensated(
    engine: Engine, order: dict[str, Any]
) -> None:
    # The stock step is inside its transaction (effect made, ledger row written, not
    # committed) when the sweeper gives up on the saga.
    step_conn = engine.connect()
    step_tx = step_conn.begin()
    assert SAGA.apply(RESERVE_STOCK, step_conn, order["payload"]) is None
    now = datetime.now(UTC)
    from sagas.engine import StepOutcome

    record_step(
        step_conn,
        order["saga_id"],
        StepOutcome(RESERVE_STOCK, StepStatus.APPLIED),
        started_at=now,
        now=now,
    )
    done = threading.Event()

    def sweep() -> None:
        runner.complete(
            engine, SAGA, order["saga_id"], retry_after=RETRY, abort_missing="timed_out"
        )
        done.set()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    assert not done.wait(0.5), "the sweeper must wait for the step's transaction"
    step_tx.commit()
    step_conn.close()
    sweeper.join(10)

    assert done.is_set()
    assert ledger(engine, order["saga_id"]) == {
        RESERVE_STOCK: "COMPENSATED",
        RESERVE_CREDIT: "ABORTED",
    }
    assert stock_of(engine, order["product"]) == Stock(5, 0)
    assert order_row(engine, order["order_id"]).status == "CANCELLED"


class FailingConfirm(OrderSaga):
    def confirm(self, conn: Connection, payload: Mapping[str, Any]) -> None:
        raise RuntimeError("the ERP refused the confirmation")


def test_a_confirmation_that_fails_cancels_and_releases_everything(
    engine: Engine, order: dict[str, Any]
) -> None:
    run(engine, order, RESERVE_STOCK)
    run(engine, order, RESERVE_CREDIT)
    done = runner.complete(engine, FailingConfirm(), order["saga_id"], retry_after=RETRY)

    assert done.decision is not None and done.decision.reason == "confirmation_failed"
    row = order_row(engine, order["order_id"])
    assert (row.status, row.cancel_reason) == ("CANCELLED", "confirmation_failed")
    assert stock_of(engine, order["product"]) == Stock(5, 0)
    assert credit_of(engine, order["customer"]).reserved == Decimal("0")


class FailingRelease(OrderSaga):
    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        raise RuntimeError("stock service unavailable")


def test_a_compensation_that_fails_is_visible_and_finished_by_a_later_retry(
    engine: Engine, publisher: Celery
) -> None:
    order = accept(engine, limit="5.00")  # 20.00 is over the limit: stock must go back
    assert run(engine, order, RESERVE_STOCK).status is StepStatus.APPLIED
    assert run(engine, order, RESERVE_CREDIT).status is StepStatus.REFUSED

    done = runner.complete(engine, FailingRelease(), order["saga_id"], retry_after=RETRY)
    assert done.decision is not None and done.decision.state is SagaState.COMPENSATION_FAILED
    saga = saga_row(engine, order["saga_id"])
    assert (saga.state, saga.reason) == ("COMPENSATION_FAILED", "credit_limit_exceeded")
    assert "stock service unavailable" in saga.error
    row = order_row(engine, order["order_id"])
    assert row.status == "COMPENSATION_FAILED" and row.problem.startswith("RuntimeError: ")
    assert stock_of(engine, order["product"]) == Stock(5, 2)  # still held: nothing silent

    # A second failure updates the problem without another event.
    runner.complete(engine, FailingRelease(), order["saga_id"], retry_after=RETRY)
    assert event_types(engine, order["order_id"]) == ["OrderPlaced", "OrderCompensationFailed"]

    overdue(engine, order["saga_id"])  # the retry time has come; the cause is fixed
    report = sweep_overdue(engine, publisher, SAGAS, POLICY)
    assert report.completed == 1
    row = order_row(engine, order["order_id"])
    assert (row.status, row.cancel_reason, row.problem) == (
        "CANCELLED",
        "credit_limit_exceeded",
        None,
    )
    assert stock_of(engine, order["product"]) == Stock(5, 0)
    assert event_types(engine, order["order_id"]) == [
        "OrderPlaced",
        "OrderCompensationFailed",
        "OrderCancelled",
    ]
    assert saga_row(engine, order["saga_id"]).error is None


def test_a_compensation_that_keeps_failing_backs_off_then_is_left_to_an_operator(
    engine: Engine, publisher: Celery
) -> None:
    order = accept(engine, limit="5.00")
    run(engine, order, RESERVE_STOCK)
    run(engine, order, RESERVE_CREDIT)
    done = runner.complete(engine, FailingRelease(), order["saga_id"], retry_after=RETRY)
    assert (done.attempts, done.escalated) == (1, False)
    assert waits(saga_row(engine, order["saga_id"]), timedelta(seconds=60))

    decided: list[runner.Completion] = []
    for attempts, wait in ((2, 100), (3, None)):  # 60 s doubled, capped at 100 s; then none
        overdue(engine, order["saga_id"])
        sweep_overdue(
            engine, publisher, SagaRegistry([FailingRelease()]), POLICY, on_complete=decided.append
        )
        assert (decided[-1].attempts, decided[-1].escalated) == (attempts, wait is None)
        row = saga_row(engine, order["saga_id"])
        assert (row.state, row.recovery_attempts) == ("COMPENSATION_FAILED", attempts)
        if wait is not None:
            assert waits(row, timedelta(seconds=wait))
        else:
            assert row.deadline_at == runner.NEVER  # no sweeper takes it up again
    assert decided[-1].saga_id == order["saga_id"]
    assert sweep_overdue(engine, publisher, SAGAS, POLICY).completed == 0

    # An operator, the cause mended, retries it by hand.
    done = runner.complete(engine, SAGA, order["saga_id"], retry_after=RETRY)
    assert done.decision is not None and done.decision.state is SagaState.CANCELLED
    assert stock_of(engine, order["product"]) == Stock(5, 0)


def test_the_api_answers_503_while_the_database_is_unreachable(settings: Settings) -> None:
    from config.database import make_engine
    from orders.api import create_app
    from scripts.services import free_port
    from tests.conftest import API_KEY

    dead = replace(settings, database_url=f"postgresql+psycopg2://x@127.0.0.1:{free_port()}/x")
    app = create_app(dead, starter=RecordingLauncher(), engine=make_engine(dead))
    response = app.test_client().post(
        "/orders",
        json={"customer_id": "A", "lines": [{"product_id": "B", "quantity": 1}]},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert response.headers["Retry-After"] == "5"
