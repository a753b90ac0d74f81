"""Operators' tools on real PostgreSQL and Redis: credit reviews, dead letters, batch
runs, and their admin endpoints."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID, uuid4

import pytest
from celery import Celery
from celery.beat import ScheduleEntry, Scheduler
from kombu.exceptions import OperationalError
from redis import Redis
from sqlalchemy import Engine, select, update

from config import names
from config.schedules import credit_check_schedule, window_key
from config.settings import Settings
from orders import services
from orders.api import create_app
from orders.credit_review import review_customers
from orders.domain import OrderLine, PlaceOrder
from orders.saga import DEFINITIONS
from orders.tables import credit_reviews, customers
from scripts.services import free_port
from tests.conftest import ADMIN_KEY, API_KEY, Servers
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product
from workers import batch, dlq
from workers.admin import Operations
from workers.celery_app import create_celery
from workers.tables import batch_runs


@pytest.fixture
def broker(settings: Settings, servers: Servers) -> Iterator[Settings]:
    own = replace(
        settings,
        broker_url=servers.redis.url(20),
        result_backend_url=servers.redis.url(21),
        credit_check_chunk_size=100,
    )
    Redis.from_url(own.broker_url).flushdb()
    yield own
    Redis.from_url(own.broker_url).flushdb()


@pytest.fixture
def publisher(broker: Settings) -> Celery:
    return create_celery(broker, publisher=True)


def queued(settings: Settings, queue: str) -> list[dict[str, Any]]:
    redis = Redis.from_url(settings.broker_url)
    found = []
    for raw in reversed(redis.lrange(queue, 0, -1)):
        message = json.loads(raw)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        found.append(
            {
                "task": message["headers"]["task"],
                "id": message["headers"]["id"],
                "args": args,
                "kwargs": kwargs,
            }
        )
    return found


def review_of(engine: Engine, customer_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(credit_reviews).where(credit_reviews.c.customer_id == customer_id)
        ).one()


def test_a_credit_review_flags_over_limit_and_inconsistent_customers(engine: Engine) -> None:
    fine = add_customer(engine, limit="100.00")
    lowered = add_customer(engine, limit="100.00")
    drifted = add_customer(engine, limit="100.00")
    with engine.begin() as conn:  # a risk review lowered the limit below what is used
        conn.execute(
            update(customers)
            .where(customers.c.id == lowered)
            .values(credit_used=Decimal("80.00"), credit_limit=Decimal("50.00"))
        )
        conn.execute(
            update(customers)
            .where(customers.c.id == drifted)
            .values(credit_reserved=Decimal("10.00"))
        )  # reserved, but no open order
    run_id = uuid4()
    with engine.begin() as conn:
        reviews = {
            r.customer_id: r
            for r in review_customers(conn, [fine, lowered, drifted], run_id, datetime.now(UTC))
        }

    assert not reviews[fine].flagged
    assert reviews[lowered].over_limit
    assert reviews[lowered].available == Decimal("-30.00")
    assert reviews[drifted].inconsistent and not reviews[drifted].over_limit
    assert "credit reserved 10.00 but open orders total only 0.00" in reviews[drifted].findings
    stored = review_of(engine, lowered)
    assert (stored.over_limit, stored.run_id, stored.credit_limit) == (
        True,
        run_id,
        Decimal("50.00"),
    )


def test_a_pending_orders_reserved_credit_is_consistent(engine: Engine) -> None:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    services.place_order(
        engine, PlaceOrder(customer, (OrderLine(product, 2),), client="t"), RecordingLauncher()
    )
    with engine.begin() as conn:
        conn.execute(
            update(customers)
            .where(customers.c.id == customer)
            .values(credit_reserved=Decimal("20.00"))
        )
        (review,) = review_customers(conn, [customer], uuid4(), datetime.now(UTC))
    assert not review.flagged


def test_dead_letters_are_kept_listed_replayed_and_purged(
    engine: Engine, broker: Settings, publisher: Celery
) -> None:
    task = f"tests.{uuid4().hex[:8]}"
    for n in range(3):
        dlq.record(
            engine,
            task_id=f"{task}-{n}",
            task_name=task,
            kind="exhausted",
            error=f"OperationalError: server closed the connection ({n})",
            args=[n],
            kwargs={"x": n},
            queue=broker.default_queue,
            attempts=9,
        )
    dlq.record(
        engine,
        task_id=f"{task}-0",
        task_name=task,
        kind="exhausted",
        error="OperationalError: again",
        args=[0],
        kwargs={"x": 0},
        queue=broker.default_queue,
        attempts=9,
    )
    letters = dlq.list_letters(engine, dlq.Filter(task=task))
    assert len(letters) == 3
    again = next(letter for letter in letters if letter.task_id == f"{task}-0")
    assert (again.attempts, again.error) == (10, "OperationalError: again")
    assert len(dlq.list_letters(engine, dlq.Filter(task=task, error="(2)"))) == 1
    assert dlq.list_letters(engine, dlq.Filter(task=task, older_than=timedelta(hours=1))) == []

    replayed = dlq.replay(engine, publisher, [again.id], DEFINITIONS)
    (message,) = queued(broker, broker.default_queue)
    assert (message["task"], message["args"], message["kwargs"]) == (task, [0], {"x": 0})
    assert message["id"] == replayed[again.id]
    assert dlq.show(engine, again.id).state == "REPLAYED"
    with pytest.raises(dlq.DeadLetterError, match="REPLAYED"):
        dlq.replay(engine, publisher, [again.id], DEFINITIONS)

    others = [letter.id for letter in letters if letter.id != again.id]
    with pytest.raises(dlq.DeadLetterError, match="REPLAYED"):  # one refused: none replayed
        dlq.replay(engine, publisher, [*others, again.id], DEFINITIONS)
    with pytest.raises(dlq.UnknownLetterError):
        dlq.replay(engine, publisher, [*others, 2**62], DEFINITIONS)
    assert len(queued(broker, broker.default_queue)) == 1
    assert dlq.purge(engine, others) == 2
    assert dlq.list_letters(engine, dlq.Filter(task=task)) == []
    assert len(dlq.list_letters(engine, dlq.Filter(task=task, state="PURGED"))) == 2


def test_replaying_a_dead_saga_step_dispatches_its_saga_again(
    engine: Engine, broker: Settings, publisher: Celery
) -> None:
    launcher = RecordingLauncher()
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    services.place_order(
        engine, PlaceOrder(customer, (OrderLine(product, 1),), client="t"), launcher
    )
    (start,) = launcher.launched
    dlq.record(
        engine,
        task_id=f"{start.saga_id}.reserve_stock",
        task_name=names.RESERVE_STOCK,
        kind="exhausted",
        error="OperationalError",
        args=[str(start.saga_id), {}],
        queue=broker.saga_queue,
    )
    (letter,) = dlq.list_letters(
        engine, dlq.Filter(task=names.RESERVE_STOCK, error="Operational", limit=1)
    )
    dlq.replay(engine, publisher, [letter.id], DEFINITIONS)
    tasks = [m["task"] for m in queued(broker, broker.saga_queue)]
    assert tasks == [names.RESERVE_STOCK, names.RESERVE_CREDIT]  # the whole saga again


def test_a_run_per_window_each_chunk_counted_once_and_a_replayed_chunk_moves_its_count(
    engine: Engine, broker: Settings, publisher: Celery
) -> None:
    window = f"test-{uuid4()}"
    run_id = batch.start_run(engine, publisher, broker, window=window)
    assert run_id is not None
    assert batch.start_run(engine, publisher, broker, window=window) is None  # second beat
    chunks = [m for m in queued(broker, broker.batch_queue) if m["args"][0] == str(run_id)]
    status = batch.run_status(engine, run_id)
    assert status is not None and len(chunks) == status.chunks >= 1
    assert sum(len(m["args"][2]) for m in chunks) == status.total

    first, *rest = chunks
    batch.fail_chunk(engine, run_id, first["args"][1], len(first["args"][2]))
    for message in rest:
        _, number, ids = message["args"]
        batch.run_chunk(engine, run_id, number, ids)
        batch.run_chunk(engine, run_id, number, ids)  # a redelivery counts nothing
    status = batch.run_status(engine, run_id)
    assert status is not None
    assert (status.state, status.failed, status.processed) == (
        "FINISHED",
        len(first["args"][2]),
        status.total - len(first["args"][2]),
    )
    assert status.progress == 100.0

    batch.run_chunk(engine, run_id, first["args"][1], first["args"][2])  # replayed
    status = batch.run_status(engine, run_id)
    assert status is not None
    assert (status.failed, status.processed, status.chunks_failed) == (0, status.total, 0)


def test_a_run_whose_chunks_could_not_be_published_publishes_them_when_started_again(
    engine: Engine, broker: Settings, publisher: Celery
) -> None:
    window = f"test-{uuid4()}"
    unreachable = create_celery(
        replace(broker, broker_url=f"redis://127.0.0.1:{free_port()}/0"), publisher=True
    )
    with pytest.raises(OperationalError):
        batch.start_run(engine, unreachable, broker, window=window)
    with engine.connect() as conn:
        run_id, state = conn.execute(
            select(batch_runs.c.id, batch_runs.c.state).where(batch_runs.c.window_key == window)
        ).one()
    assert state == "PUBLISHING"  # committed first: a chunk never arrives before its run

    assert batch.start_run(engine, publisher, broker, window=window) == run_id  # the retry
    status = batch.run_status(engine, run_id)
    assert status is not None and status.state == "RUNNING"
    chunks = [m for m in queued(broker, broker.batch_queue) if m["args"][0] == str(run_id)]
    assert [m["args"][1] for m in chunks] == list(range(status.chunks))
    assert batch.start_run(engine, publisher, broker, window=window) is None  # published


def test_the_admin_endpoints_need_an_operators_key(
    engine: Engine, broker: Settings, publisher: Celery
) -> None:
    operations = Operations(engine, publisher, broker, DEFINITIONS)
    app = create_app(broker, starter=RecordingLauncher(), engine=engine, operations=operations)
    client = app.test_client()
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (
        client.get(
            "/admin/dead-letters", headers={"Authorization": f"Bearer {API_KEY}"}
        ).status_code
        == 403
    )
    assert client.get("/admin/dead-letters").status_code == 401

    task = f"tests.{uuid4().hex[:8]}"
    dlq.record(
        engine,
        task_id=f"{task}-1",
        task_name=task,
        kind="failed",
        error="ValueError: x",
        args=[1],
        queue=broker.default_queue,
    )
    listed = client.get(f"/admin/dead-letters?task={task}", headers=admin).json["dead_letters"]
    (letter,) = listed
    shown = client.get(f"/admin/dead-letters/{letter['id']}", headers=admin).json
    assert shown["error"] == "ValueError: x" and shown["kind"] == "failed"
    replayed = client.post(f"/admin/dead-letters/{letter['id']}/replay", headers=admin)
    assert replayed.status_code == 202
    refused = client.post(f"/admin/dead-letters/{letter['id']}/replay", headers=admin)
    assert refused.status_code == 409 and refused.mimetype == "application/problem+json"
    for unknown in (2**62, 2**64):
        missing = client.post(f"/admin/dead-letters/{unknown}/replay", headers=admin)
        assert missing.status_code == 404 and missing.mimetype == "application/problem+json"
    for query in ("limit=-1", "limit=0", "older_than_seconds=nan", "older_than_seconds=inf"):
        bad = client.get(f"/admin/dead-letters?{query}", headers=admin)
        assert bad.status_code == 400 and bad.mimetype == "application/problem+json", query
    assert (
        client.post("/admin/dead-letters/purge", headers=admin, json={"ids": []}).status_code == 422
    )

    started = client.post("/admin/batches/credit-check", headers=admin)
    assert started.status_code == 202
    run = client.get(started.headers["Location"], headers=admin).json
    assert run["state"] == "RUNNING" and run["total"] >= 1
    assert client.get(f"/batches/{uuid4()}", headers=admin).status_code == 404
    with engine.connect() as conn:
        assert (
            conn.execute(select(batch_runs.c.window_key).where(batch_runs.c.id == UUID(run["id"])))
            .scalar_one()
            .startswith("manual-")
        )


def test_a_start_sent_by_beat_carries_the_tick_it_was_sent_in(broker: Settings) -> None:
    """The run's window is read when beat sends the start, not when a worker gets to it:
    a start held back in a busy lane past the next tick still counts for its own."""
    hourly = replace(broker, credit_check_every_seconds=3600)
    app = create_celery(hourly)  # as beat builds it
    scheduler = Scheduler(app, lazy=True)
    entry = ScheduleEntry(
        name="credit-check",
        task=names.START_CREDIT_CHECK,
        schedule=credit_check_schedule(hourly),
        app=app,
    )
    before = window_key(hourly)
    scheduler.apply_async(entry)
    after = window_key(hourly)
    (sent,) = [
        m for m in queued(hourly, names.DEFAULT_QUEUE) if m["task"] == names.START_CREDIT_CHECK
    ]
    assert sent["args"] == [] and sent["kwargs"]["window"] in {before, after}

    # A start that names its window keeps it.
    app.tasks[names.START_CREDIT_CHECK].apply_async(kwargs={"window": "manual-x"})
    windows = [m["kwargs"]["window"] for m in queued(hourly, names.DEFAULT_QUEUE)]
    assert windows[-1] == "manual-x"
