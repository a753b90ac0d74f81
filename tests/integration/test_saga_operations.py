"""The operators' saga tools on real sagas (PostgreSQL, and a real Redis as the broker):
listing stuck first with keyset pages, showing one saga in full, retrying its missing
steps, cancelling it, retrying its failed compensation; and the dead-letter refusal of a
step whose saga was decided meanwhile."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from redis import Redis
from sqlalchemy import Connection, Engine, insert, select, update

from config import names
from config.settings import Settings
from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.refund_saga import RefundSaga
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from orders.tables import orders
from sagas import runner
from sagas.engine import SagaState
from sagas.operations import (
    OPERATOR_CANCELLED,
    SagaActionRefusedError,
    SagaNotFoundError,
    SagaQuery,
    SagaTools,
    list_sagas,
)
from sagas.recovery import RecoveryPolicy
from sagas.registry import SagaRegistry
from sagas.tables import saga_steps, sagas
from tests.fakes import RecordingLauncher
from tests.helpers import Stock, add_customer, add_product, credit_of, stock_of
from workers import dlq
from workers.celery_app import create_celery
from workers.tables import dead_letters

POLICY = RecoveryPolicy(
    deadline=timedelta(seconds=30),
    timeout=timedelta(hours=1),
    redrive_max=timedelta(seconds=100),
    recheck=timedelta(seconds=5),
    compensation_retry=timedelta(seconds=60),
    compensation_retry_max=timedelta(seconds=100),
    compensation_max_attempts=3,
)


class FailingRelease(OrderSaga):
    """The order saga whose compensation fails (a store that is down)."""

    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        raise RuntimeError("stock service unavailable")


@pytest.fixture
def redis(servers: Any) -> Iterator[Redis]:
    client = Redis.from_url(servers.redis.url(16))
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def publisher(settings: Settings, servers: Any, redis: Redis) -> Celery:
    own = replace(
        settings, broker_url=servers.redis.url(16), result_backend_url=servers.redis.url(17)
    )
    return create_celery(own, publisher=True)


def tools_of(engine: Engine, publisher: Celery, order_saga: OrderSaga | None = None) -> SagaTools:
    registry = SagaRegistry([order_saga or OrderSaga(), RefundSaga()])
    return SagaTools(engine, publisher, registry.get, POLICY)


@pytest.fixture
def tools(engine: Engine, publisher: Celery) -> SagaTools:
    return tools_of(engine, publisher)


def accept(engine: Engine, *, limit: str = "100.00") -> dict[str, Any]:
    """An accepted order of 2 units at 10.00 whose saga was staged, never dispatched."""
    customer, product = add_customer(engine, limit=limit), add_product(engine, on_hand=5)
    launcher = RecordingLauncher()
    accepted = services.place_order(
        engine, PlaceOrder(customer, (OrderLine(product, 2),), client="tests"), launcher
    )
    (start,) = launcher.launched
    return {
        "customer": customer,
        "product": product,
        "order_id": accepted.order_id,
        "saga_id": start.saga_id,
        "payload": start.payload,
    }


def run(engine: Engine, order: dict[str, Any], step: str, saga: Any = None) -> Any:
    saga = saga or OrderSaga()
    return runner.run_step(engine, saga, order["saga_id"], step, order["payload"])


def order_row(engine: Engine, order_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(orders).where(orders.c.id == order_id)).one()


def saga_row(engine: Engine, saga_id: uuid.UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(sagas).where(sagas.c.id == saga_id)).one()


def test_lists_stuck_sagas_first_then_running_then_finished_a_page_at_a_time(
    engine: Engine,
) -> None:
    name = f"ops-{uuid.uuid4().hex[:8]}"  # these sagas alone
    now = datetime.now(UTC)
    rows = {
        "finished_early": ("CONFIRMED", now - timedelta(hours=2), now - timedelta(hours=1)),
        "on_time": ("RUNNING", now + timedelta(seconds=30), None),
        "overdue_long": ("RUNNING", now - timedelta(minutes=10), None),
        "escalated": ("COMPENSATION_FAILED", runner.NEVER, None),
        "overdue_short": ("RUNNING", now - timedelta(seconds=5), None),
        "finished_late": ("CANCELLED", now - timedelta(minutes=1), now - timedelta(seconds=10)),
    }
    ids = {label: uuid.uuid4() for label in rows}
    with engine.begin() as conn:
        for label, (state, deadline, finished) in rows.items():
            conn.execute(
                insert(sagas).values(
                    id=ids[label],
                    name=name,
                    state=state,
                    payload={},
                    deadline_at=deadline,
                    created_at=now - timedelta(hours=3),
                    finished_at=finished,
                )
            )
        conn.execute(
            insert(saga_steps).values(
                saga_id=ids["overdue_long"],
                step="reserve_stock",
                status="APPLIED",
                started_at=now,
                finished_at=now,
            )
        )

    seen, cursor, pages = [], None, 0
    while True:
        page = list_sagas(engine, SagaQuery(name=name, limit=2, after=cursor))
        seen += page.sagas
        pages += 1
        if page.next is None:
            break
        cursor = page.next
    order = ["escalated", "overdue_long", "overdue_short", "on_time"]
    order += ["finished_late", "finished_early"]
    assert [row.id for row in seen] == [str(ids[label]) for label in order]
    assert pages == 3
    assert [row.stuck for row in seen] == [True, True, True, False, False, False]
    assert seen[0].deadline_at is None  # left to an operator
    assert seen[1].steps == {"reserve_stock": "APPLIED"}

    running = list_sagas(engine, SagaQuery(states=(SagaState.RUNNING,), name=name)).sagas
    assert [row.id for row in running] == [
        str(ids[label]) for label in ("overdue_long", "overdue_short", "on_time")
    ]
    young = SagaQuery(name=name, older_than=timedelta(hours=4))
    assert list_sagas(engine, young).sagas == []


def test_lists_filters_that_the_indexes_serve(engine: Engine) -> None:
    """Each band of the list is a range of a partial index read in order: a page costs
    what it returns, however many sagas the table holds."""
    with engine.connect() as conn:
        for where in (
            "state IN ('RUNNING', 'COMPENSATION_FAILED') AND deadline_at < now()",
            "state IN ('CONFIRMED', 'CANCELLED') AND state = 'CANCELLED'",
        ):
            order = "deadline_at" if "deadline" in where else "finished_at DESC"
            # On a small table a sort is cheaper; with these off, a plan without a
            # sort exists only when an index delivers the rows in the list's order.
            for method in ("seqscan", "bitmapscan", "sort"):
                conn.exec_driver_sql(f"SET LOCAL enable_{method} = off")
            plan = "\n".join(
                row[0]
                for row in conn.exec_driver_sql(
                    f"EXPLAIN SELECT id FROM sagas WHERE {where} ORDER BY {order} LIMIT 51"  # noqa: S608
                )
            )
            assert "ix_sagas_active_deadline" in plan or "ix_sagas_finished" in plan, plan
            assert "Sort" not in plan.split("Index")[0], plan


def test_shows_a_saga_with_its_ledger_timeline_and_error(engine: Engine, publisher: Celery) -> None:
    order = accept(engine, limit="5.00")  # over the limit: the stock must go back
    run(engine, order, RESERVE_STOCK)
    run(engine, order, RESERVE_CREDIT)
    failing = tools_of(engine, publisher, FailingRelease())
    runner.complete(engine, FailingRelease(), order["saga_id"], retry_after=lambda n: None)

    shown = failing.show(order["saga_id"]).to_dict()
    assert (shown["state"], shown["reason"]) == ("COMPENSATION_FAILED", "credit_limit_exceeded")
    assert "stock service unavailable" in shown["error"]
    assert shown["stuck"] and shown["deadline_at"] is None
    assert {(s["step"], s["status"], s["attempts"]) for s in shown["ledger"]} == {
        (RESERVE_STOCK, "APPLIED", 1),
        (RESERVE_CREDIT, "REFUSED", 1),
    }
    events = [(e["event"], e.get("step")) for e in shown["timeline"]]
    assert events[0] == ("accepted", None)
    assert events[-1] == ("compensation_failed", None)
    assert ("finished", RESERVE_CREDIT) in events
    with pytest.raises(SagaNotFoundError):
        failing.show(uuid.uuid4())


def test_retry_dispatches_a_running_saga_whose_messages_were_lost(
    engine: Engine, tools: SagaTools, redis: Redis
) -> None:
    order = accept(engine)
    run(engine, order, RESERVE_STOCK)  # the credit step's message was lost

    done = tools.retry(order["saga_id"])
    assert (done.outcome, done.state) == ("redriven", "RUNNING")
    assert done.dispatched == [RESERVE_STOCK, RESERVE_CREDIT]
    assert "reserve_credit had no outcome" in done.detail
    assert redis.llen(names.SAGA_QUEUE) == 2  # the saga's chord, sent again
    assert saga_row(engine, order["saga_id"]).redrives == 1

    run(engine, order, RESERVE_CREDIT)  # every step has an outcome now: retry completes it
    done = tools.retry(order["saga_id"])
    assert (done.outcome, done.state) == ("completed", "CONFIRMED")
    with pytest.raises(SagaActionRefusedError, match=r"is CONFIRMED.*nothing to do"):
        tools.retry(order["saga_id"])


def test_an_operator_cancel_releases_what_was_reserved(engine: Engine, tools: SagaTools) -> None:
    order = accept(engine)
    run(engine, order, RESERVE_STOCK)
    run(engine, order, RESERVE_CREDIT)

    done = tools.cancel(order["saga_id"])
    assert (done.outcome, done.reason) == ("CANCELLED", OPERATOR_CANCELLED)
    assert sorted(done.compensated) == [RESERVE_CREDIT, RESERVE_STOCK]
    row = order_row(engine, order["order_id"])
    assert (row.status, row.cancel_reason) == ("CANCELLED", "operator_cancelled")
    assert stock_of(engine, order["product"]) == Stock(5, 0)
    assert credit_of(engine, order["customer"]).reserved == 0
    with pytest.raises(SagaActionRefusedError, match="CANCELLED \\(operator_cancelled\\)"):
        tools.cancel(order["saga_id"])
    with pytest.raises(SagaNotFoundError):
        tools.cancel(uuid.uuid4())


def test_retry_compensation_says_it_failed_again_then_that_it_cancelled(
    engine: Engine, publisher: Celery
) -> None:
    order = accept(engine, limit="5.00")
    run(engine, order, RESERVE_STOCK)
    run(engine, order, RESERVE_CREDIT)
    runner.complete(
        engine, FailingRelease(), order["saga_id"], retry_after=POLICY.compensation_wait
    )
    with pytest.raises(SagaActionRefusedError, match="use retry-compensation"):
        tools_of(engine, publisher).retry(order["saga_id"])

    again = tools_of(engine, publisher, FailingRelease()).retry_compensation(order["saga_id"])
    assert (again.outcome, again.state) == ("COMPENSATION_FAILED", "COMPENSATION_FAILED")
    assert again.error is not None and "stock service unavailable" in again.error
    assert "2 failures" in again.detail

    done = tools_of(engine, publisher).retry_compensation(order["saga_id"])
    assert (done.outcome, done.state, done.compensated) == (
        "CANCELLED",
        "CANCELLED",
        [RESERVE_STOCK],
    )
    row = order_row(engine, order["order_id"])
    assert (row.status, row.cancel_reason) == ("CANCELLED", "credit_limit_exceeded")
    assert stock_of(engine, order["product"]) == Stock(5, 0)
    with pytest.raises(SagaActionRefusedError, match="not COMPENSATION_FAILED"):
        tools_of(engine, publisher).retry_compensation(order["saga_id"])


def test_a_dead_letter_of_a_step_whose_saga_was_decided_says_why_and_what_to_do(
    engine: Engine, publisher: Celery
) -> None:
    order = accept(engine)
    saga_id = order["saga_id"]
    runner.abort_step(engine, saga_id, RESERVE_STOCK, "poison_message")
    run(engine, order, RESERVE_CREDIT)
    runner.complete(engine, OrderSaga(), saga_id, retry_after=POLICY.compensation_wait)
    dlq.record(
        engine,
        task_id=f"{saga_id}.{RESERVE_STOCK}",
        task_name=names.RESERVE_STOCK,
        kind=dlq.POISON,
        error="the message crashed its worker",
        args=[str(saga_id), order["payload"]],
        kwargs={},
        queue=names.SAGA_QUEUE,
    )
    with engine.connect() as conn:
        letter = conn.execute(
            select(dead_letters.c.id).where(dead_letters.c.task_id == f"{saga_id}.{RESERVE_STOCK}")
        ).scalar_one()

    with pytest.raises(dlq.DeadLetterError) as refused:
        dlq.replay(engine, publisher, [letter], SagaRegistry([OrderSaga(), RefundSaga()]))
    text = str(refused.value)
    finished = saga_row(engine, saga_id).finished_at.isoformat()
    assert f"saga {saga_id} (order) was CANCELLED (poison_message) at {finished}" in text
    assert "step reserve_stock was recorded ABORTED (poison_message) at" in text
    assert "its effect never took place" in text
    assert f"purge the letter with `python -m workers.dlq purge {letter}`" in text
    assert "to retry the order, place it again" in text
    with engine.connect() as conn:  # refused as a whole: the letter is still open
        state = conn.execute(select(dead_letters.c.state).where(dead_letters.c.id == letter))
        assert state.scalar_one() == "OPEN"
    with engine.begin() as conn:
        conn.execute(update(dead_letters).where(dead_letters.c.id == letter).values(state="PURGED"))
