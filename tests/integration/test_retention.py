"""The retention job on real PostgreSQL, as the application's role: what is past its
retention goes, what is within stays, an order's reads still answer without its saga
and events, nothing of an active saga goes, and a run stays within its budget.

Rows are made old by moving their time stamps back (as the schema's owner)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Connection, Engine, func, insert, select, text

from config import names
from config.celeryconf import celery_config
from config.database import make_engine
from config.settings import Settings
from orders import events, services
from orders.api import create_app
from orders.domain import OrderLine, PlaceOrder
from orders.events import Event
from orders.projections import CustomerSummaries
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from orders.saga_timeline import SqlTimeline
from orders.tables import (
    consumer_checkpoints,
    idempotency_keys,
    order_events,
    orders,
    retention_cursors,
)
from sagas import runner
from sagas.tables import saga_steps, sagas
from tests.conftest import API_KEY, Servers, migrate, register_test_keys
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product
from workers.celery_app import create_celery
from workers.retention import RetentionPolicy, run_retention
from workers.tables import batch_chunks, batch_runs, dead_letters

AUTH = {"Authorization": f"Bearer {API_KEY}"}
POLICY = RetentionPolicy(
    sagas=timedelta(days=30),
    idempotency_keys=timedelta(hours=24),
    events=timedelta(days=30),
    dead_letters=timedelta(days=30),
    batch_runs=timedelta(days=90),
)


class Recorder:
    """A consumer under a name of its own that applies nothing."""

    def __init__(self) -> None:
        self.name = f"test-{uuid.uuid4().hex[:12]}"

    def apply(self, conn: Connection, batch: Sequence[Event]) -> None:
        """Nothing to do: the positions are what the test looks at."""


@dataclass(frozen=True)
class Placed:
    order_id: UUID
    saga_id: UUID
    customer: str
    key: str


#: The module's own database: what retention removes is judged against the whole event
#: feed, so the session's history (other tests' events) must not be in it.
DATABASE = "orders_retention"


@pytest.fixture(scope="module")
def settings(settings: Settings, servers: Servers) -> Settings:
    """The session's settings, on a database of this module's own."""
    servers.postgres.create_database(DATABASE)
    migrate(servers.postgres.url(DATABASE, role="owner"))
    own = replace(settings, database_url=servers.postgres.url(DATABASE))
    register_test_keys(own, servers.postgres.url(DATABASE, role="owner"))
    return own


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings, application_name="orders-tests-retention")
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def owner_engine(settings: Settings, servers: Servers) -> Iterator[Engine]:
    engine = make_engine(
        replace(settings, database_url=servers.postgres.url(DATABASE, role="owner")),
        application_name="orders-tests-retention-owner",
    )
    yield engine
    engine.dispose()


@pytest.fixture
def feed(owner_engine: Engine) -> Iterator[None]:
    """Only this test's consumers have checkpoints while it runs (other tests' stay
    where they were, and are put back)."""
    with owner_engine.begin() as conn:
        kept = [dict(row._mapping) for row in conn.execute(select(consumer_checkpoints))]
        conn.execute(consumer_checkpoints.delete())
    yield
    with owner_engine.begin() as conn:
        conn.execute(consumer_checkpoints.delete())
        if kept:
            conn.execute(insert(consumer_checkpoints), kept)


def place(engine: Engine, *, decide: bool = True, limit: str = "100.00") -> Placed:
    """An order with an idempotency key; ``decide``: its saga run to its end."""
    customer, product = add_customer(engine, limit=limit), add_product(engine, on_hand=5)
    key = f"key-{uuid.uuid4().hex}"
    launcher = RecordingLauncher()
    cmd = PlaceOrder(customer, (OrderLine(product, 1),), client="retention", idempotency_key=key)
    accepted = services.place_order(engine, cmd, launcher)
    (start,) = launcher.launched
    if decide:
        saga = OrderSaga()
        runner.run_step(engine, saga, start.saga_id, RESERVE_STOCK, start.payload)
        runner.run_step(engine, saga, start.saga_id, RESERVE_CREDIT, start.payload)
        runner.complete(engine, saga, start.saga_id, retry_after=timedelta(seconds=60))
    return Placed(accepted.order_id, start.saga_id, customer, key)


def age(owner_engine: Engine, placed: Placed, by: timedelta) -> None:
    """Move every time stamp of the order, its saga, steps, events and key back."""
    statements = (
        "UPDATE orders SET created_at = created_at - :by, updated_at = updated_at - :by"
        " WHERE id = :order",
        "UPDATE sagas SET created_at = created_at - :by, finished_at = finished_at - :by"
        " WHERE id = :saga",
        "UPDATE saga_steps SET started_at = started_at - :by, finished_at = finished_at - :by"
        " WHERE saga_id = :saga",
        "UPDATE order_events SET occurred_at = occurred_at - :by, placed_at = placed_at - :by"
        " WHERE order_id = :order",
        "UPDATE idempotency_keys SET created_at = created_at - :by WHERE order_id = :order",
    )
    with owner_engine.begin() as conn:
        for statement in statements:
            conn.execute(
                text(statement), {"by": by, "order": placed.order_id, "saga": placed.saga_id}
            )


def apply_all(engine: Engine, consumers: Sequence[Any], *placed: Placed) -> None:
    """Each consumer applies these orders' events, and its checkpoint passes them."""
    log = _events(engine, *placed)
    for consumer in consumers:
        events.deliver(engine, consumer, log)
        checkpoint(engine, consumer.name, max(e.id for e in log))


def checkpoint(engine: Engine, consumer: str, last_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO consumer_checkpoints (consumer, last_id, updated_at)"
                " VALUES (:c, :id, now())"
                " ON CONFLICT (consumer) DO UPDATE SET last_id = excluded.last_id"
            ),
            {"c": consumer, "id": last_id},
        )


def _events(engine: Engine, *placed: Placed) -> list[Event]:
    e = order_events.c
    with engine.connect() as conn:
        rows = conn.execute(
            select(e.id, e.order_id, e.seq, e.type, e.payload, e.occurred_at)
            .where(e.order_id.in_([p.order_id for p in placed]))
            .order_by(e.id)
        ).all()
    return [Event(*row) for row in rows]


def remains(engine: Engine, placed: Placed) -> dict[str, int]:
    """What is left of the order's rows, table by table."""
    with engine.connect() as conn:

        def count(table: Any, where: Any) -> int:
            return int(conn.execute(select(func.count()).select_from(table).where(where)).scalar())

        return {
            "orders": count(orders, orders.c.id == placed.order_id),
            "sagas": count(sagas, sagas.c.id == placed.saga_id),
            "saga_steps": count(saga_steps, saga_steps.c.saga_id == placed.saga_id),
            "order_events": count(order_events, order_events.c.order_id == placed.order_id),
            "idempotency_keys": count(idempotency_keys, idempotency_keys.c.key == placed.key),
        }


def letter(owner_engine: Engine, *, state: str, age: timedelta, args: list[Any]) -> int:
    at = datetime.now(UTC) - age
    with owner_engine.begin() as conn:
        return int(
            conn.execute(
                insert(dead_letters)
                .values(
                    task_id=f"retention-{uuid.uuid4()}",
                    task_name="saga.order.complete",
                    kind="failed",
                    args=args,
                    kwargs={},
                    error="test",
                    first_failed_at=at,
                    last_failed_at=at,
                    state=state,
                    resolved_at=None if state == "OPEN" else at,
                )
                .returning(dead_letters.c.id)
            ).scalar_one()
        )


def batch_run(owner_engine: Engine, *, state: str, age: timedelta) -> UUID:
    run_id, at = uuid.uuid4(), datetime.now(UTC) - age
    with owner_engine.begin() as conn:
        conn.execute(
            insert(batch_runs).values(
                id=run_id,
                job="retention-test",
                window_key=str(run_id),
                state=state,
                total=1,
                chunks=1,
                started_at=at,
                finished_at=None if state == "RUNNING" else at,
            )
        )
        conn.execute(
            insert(batch_chunks).values(
                run_id=run_id, chunk=0, size=1, state="DONE", finished_at=at
            )
        )
    return run_id


def exists(engine: Engine, table: Any, column: Any, value: Any) -> bool:
    with engine.connect() as conn:
        return (
            conn.execute(select(func.count()).select_from(table).where(column == value)).scalar()
            == 1
        )


def removed_metric(table: str) -> float:
    return REGISTRY.get_sample_value("orders_retention_rows_removed_total", {"table": table}) or 0.0


def test_removes_what_is_past_retention_and_keeps_what_is_within(
    settings: Settings, engine: Engine, owner_engine: Engine, feed: None
) -> None:
    old, recent = place(engine), place(engine)
    age(owner_engine, old, timedelta(days=40))
    age(owner_engine, recent, timedelta(hours=2))
    summaries = CustomerSummaries()
    apply_all(engine, [summaries, Recorder()], old, recent)
    old_purged = letter(owner_engine, state="PURGED", age=timedelta(days=31), args=[])
    new_purged = letter(owner_engine, state="PURGED", age=timedelta(days=29), args=[])
    old_open = letter(owner_engine, state="OPEN", age=timedelta(days=31), args=[])
    old_run = batch_run(owner_engine, state="FINISHED", age=timedelta(days=91))
    new_run = batch_run(owner_engine, state="FAILED", age=timedelta(days=89))
    running = batch_run(owner_engine, state="RUNNING", age=timedelta(days=91))
    before = removed_metric("sagas")

    removed = run_retention(engine, POLICY, [summaries.name])

    assert remains(engine, old) == {
        "orders": 1,
        "sagas": 0,
        "saga_steps": 0,
        "order_events": 0,
        "idempotency_keys": 0,
    }
    assert remains(engine, recent) == {
        "orders": 1,
        "sagas": 1,
        "saga_steps": 2,
        "order_events": 2,
        "idempotency_keys": 1,
    }
    assert not exists(engine, dead_letters, dead_letters.c.id, old_purged)
    assert exists(engine, dead_letters, dead_letters.c.id, new_purged)
    assert exists(engine, dead_letters, dead_letters.c.id, old_open)
    assert not exists(engine, batch_runs, batch_runs.c.id, old_run)
    assert not exists(engine, batch_chunks, batch_chunks.c.run_id, old_run)
    assert exists(engine, batch_runs, batch_runs.c.id, new_run)
    assert exists(engine, batch_runs, batch_runs.c.id, running)
    assert removed["sagas"] >= 1 and removed["saga_steps"] >= 2 and removed["batch_chunks"] >= 1
    assert removed_metric("sagas") - before == removed["sagas"]

    # The order is the record: every read of it still answers.
    client = create_app(
        replace(settings), starter=RecordingLauncher(), engine=engine, timeline=SqlTimeline(engine)
    ).test_client()
    order = client.get(f"/orders/{old.order_id}", headers=AUTH)
    assert order.status_code == 200 and order.json["status"] == "CONFIRMED"
    status = client.get(f"/orders/{old.order_id}/status", headers=AUTH)
    assert status.status_code == 200 and status.json["status"] == "CONFIRMED"
    listed = client.get(f"/customers/{old.customer}/orders", headers=AUTH)
    assert [o["order_id"] for o in listed.json["orders"]] == [str(old.order_id)]
    summary = client.get(f"/customers/{old.customer}/summary", headers=AUTH).json
    assert (summary["orders_placed"], summary["orders_confirmed"]) == (1, 1)
    # Its saga's timeline has expired, and says so.
    gone = client.get(f"/orders/{old.order_id}/timeline", headers=AUTH)
    assert gone.status_code == 404 and gone.mimetype == "application/problem+json"
    assert "expired" in gone.json["detail"]
    assert client.get(f"/orders/{recent.order_id}/timeline", headers=AUTH).status_code == 200


def test_nothing_of_an_active_saga_goes_however_old(
    engine: Engine, owner_engine: Engine, feed: None
) -> None:
    running = place(engine, decide=False)
    stuck = place(engine)
    with owner_engine.begin() as conn:
        conn.execute(
            text("UPDATE sagas SET state = 'COMPENSATION_FAILED' WHERE id = :s"),
            {"s": stuck.saga_id},
        )
        conn.execute(
            text("UPDATE orders SET status = 'COMPENSATION_FAILED' WHERE id = :o"),
            {"o": stuck.order_id},
        )
    for placed in (running, stuck):
        age(owner_engine, placed, timedelta(days=400))
    recorder = Recorder()
    apply_all(engine, [recorder], running, stuck)
    purged = letter(
        owner_engine, state="PURGED", age=timedelta(days=400), args=[[], str(stuck.saga_id)]
    )
    before = {placed: remains(engine, placed) for placed in (running, stuck)}

    run_retention(engine, POLICY, [recorder.name])

    assert {placed: remains(engine, placed) for placed in (running, stuck)} == before
    assert before[stuck]["sagas"] == 1 and before[stuck]["idempotency_keys"] == 1
    assert exists(engine, dead_letters, dead_letters.c.id, purged)


def test_an_event_a_consumer_has_not_applied_stays(
    engine: Engine, owner_engine: Engine, feed: None
) -> None:
    behind, done, unread = place(engine), place(engine), place(engine)
    for placed in (behind, unread, done):
        age(owner_engine, placed, timedelta(days=40))
    ahead, lagging = Recorder(), Recorder()
    apply_all(engine, [ahead], behind, done, unread)
    # The lagging consumer applied only the first event of ``behind``, all of ``done``,
    # and its checkpoint is below ``unread``'s events (though it applied them).
    log = _events(engine, behind, done, unread)
    first_of_behind = [e for e in log if e.order_id == behind.order_id and e.seq == 1]
    events.deliver(engine, lagging, first_of_behind)
    events.deliver(engine, lagging, [e for e in log if e.order_id != behind.order_id])
    checkpoint(engine, lagging.name, min(e.id for e in log if e.order_id == unread.order_id) - 1)
    # A consumer of the deployment that has no checkpoint yet holds every event.
    run_retention(engine, POLICY, [ahead.name, lagging.name, "not-yet-started"])
    assert remains(engine, done)["order_events"] == 2

    run_retention(engine, POLICY, [ahead.name, lagging.name])

    assert remains(engine, behind)["order_events"] == 1  # seq 1 went, seq 2 stays
    assert remains(engine, unread)["order_events"] == 2
    assert remains(engine, done)["order_events"] == 0
    assert remains(engine, done)["sagas"] == 0


def test_a_run_removes_at_most_its_budget_and_the_next_run_goes_on(
    engine: Engine, owner_engine: Engine
) -> None:
    placed = place(engine)
    small = replace(POLICY, rows=2, batches=2)
    for _ in range(100):  # what other tests left behind first
        if not any(run_retention(engine, POLICY, []).values()):
            break
    at = datetime.now(UTC) - timedelta(days=2)
    with owner_engine.begin() as conn:
        conn.execute(
            insert(idempotency_keys),
            [
                {
                    "client": "retention-budget",
                    "key": f"{placed.key}-{n}",
                    "fingerprint": "0" * 64,
                    "order_id": placed.order_id,
                    "created_at": at,
                }
                for n in range(5)
            ],
        )

    def left() -> int:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(idempotency_keys)
                    .where(idempotency_keys.c.client == "retention-budget")
                ).scalar()
            )

    assert run_retention(engine, small, [])["idempotency_keys"] == 4
    assert left() == 1
    assert run_retention(engine, small, [])["idempotency_keys"] == 1
    assert left() == 0
    assert run_retention(engine, small, []).get("idempotency_keys", 0) == 0


def test_events_kept_at_the_head_of_the_feed_do_not_stall_the_scan(
    engine: Engine, owner_engine: Engine, feed: None
) -> None:
    # Events only, 4 of the feed a run, judged 40 days on: every event is old.
    small = RetentionPolicy(None, None, timedelta(days=30), None, None, rows=2, batches=2)
    later = datetime.now(UTC) + timedelta(days=40)
    held = [place(engine, decide=False) for _ in range(5)]  # not final: their events stay
    done = [place(engine) for _ in range(3)]
    consumer = Recorder()
    apply_all(engine, [consumer], *held, *done)
    with engine.connect() as conn:
        ceiling = max(e.id for e in _events(engine, *done))
        spanned = conn.execute(
            select(func.count()).select_from(order_events).where(order_events.c.id <= ceiling)
        ).scalar_one()

    def from_the_lowest_id() -> None:
        with owner_engine.begin() as conn:
            conn.execute(retention_cursors.delete())

    for _ in range(3):  # every run from the lowest id: the kept head is all it reads
        from_the_lowest_id()
        assert run_retention(engine, small, [consumer.name], now=later) == {"order_events": 0}
    runs = 0
    while any(remains(engine, placed)["order_events"] for placed in done):
        runs += 1
        assert runs <= spanned // 4 + 2, "the scan did not get past the kept events"
        run_retention(engine, small, [consumer.name], now=later)
    assert all(remains(engine, placed)["order_events"] == 1 for placed in held)
    with engine.connect() as conn:
        cursor = conn.execute(select(retention_cursors.c.last_id)).scalar_one()
    assert cursor <= ceiling


def test_the_workers_task_runs_the_job_on_the_housekeeping_lane(
    settings: Settings, engine: Engine, owner_engine: Engine
) -> None:
    placed = place(engine)
    age(owner_engine, placed, timedelta(days=2))
    config = celery_config(settings)
    assert config["task_routes"][names.RETAIN] == {"queue": settings.housekeeping_queue}
    app = create_celery(replace(settings, cache_url=None))

    removed = app.tasks[names.RETAIN]()  # as a worker runs it: its own engine, as orders_app

    assert removed["idempotency_keys"] >= 1
    assert remains(engine, placed)["idempotency_keys"] == 0
    assert remains(engine, placed)["sagas"] == 1  # two days old: within its 30 days
