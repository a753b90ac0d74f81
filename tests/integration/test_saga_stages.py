"""A saga of three stages on the engine, against real PostgreSQL and Redis (no worker
consumes this broker database): each stage published as its own chord or plain task,
moved on under the saga's lock with an outbox entry, compensated latest stage first;
the relay, the sweeper and a duplicate completion, each at the saga's running stage
and on its own version."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from celery import Celery
from redis import Redis
from sqlalchemy import Connection, Engine, delete, select, update

from config import names
from config.database import after_commit
from config.settings import Settings
from sagas import runner
from sagas.canvas import dispatch_saga
from sagas.definition import SagaDefinition, SagaStart, Stage, Step, UnknownSagaVersion
from sagas.engine import SagaState, StepStatus
from sagas.launch import clear_entries, dispatch_next_stage, relay_outbox, stage_saga
from sagas.recovery import RecoveryPolicy, sweep_overdue
from sagas.registry import SagaRegistry
from sagas.tables import outbox, saga_steps, sagas
from workers.celery_app import create_celery

SEAT, ROOM, CAR, TICKET = "seat", "room", "car", "ticket"


def journey(version: int) -> SagaDefinition:
    return SagaDefinition(
        name="journey",
        stages=(
            Stage((Step(SEAT, names.TRIP_HOLD_SEAT),)),
            Stage((Step(ROOM, names.TRIP_HOLD_ROOM), Step(CAR, names.TRIP_HOLD_CAR))),
            Stage((Step(TICKET, names.TRIP_ISSUE_TICKET),)),
        ),
        complete_task=names.COMPLETE_TRIP,
        version=version,
    )


class Journey:
    """Effects as a list of what committed, in order; the payload's "refuse" names a
    step that refuses."""

    def __init__(self, version: int = 2) -> None:
        self.definition = journey(version)
        self.ran: list[tuple[str, str]] = []

    def apply(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> str | None:
        if payload.get("refuse") == step:
            return "refused_by_test"
        self._done(conn, "apply", step)
        return None

    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        self._done(conn, "undo", step)

    def confirm(self, conn: Connection, payload: Mapping[str, Any]) -> None:
        self._done(conn, "confirm", "")

    def cancel(self, conn: Connection, payload: Mapping[str, Any], reason: str) -> None:
        self._done(conn, "cancel", reason)

    def compensation_failed(
        self, conn: Connection, payload: Mapping[str, Any], reason: str, problem: str
    ) -> None:
        self._done(conn, "compensation_failed", reason)

    def _done(self, conn: Connection, what: str, detail: str) -> None:
        after_commit(conn, lambda: self.ran.append((what, detail)))


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


@pytest.fixture
def redis(settings: Settings, servers: Any) -> Iterator[Redis]:
    client = Redis.from_url(servers.redis.url(8))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def publisher(settings: Settings, servers: Any, redis: Redis) -> Celery:
    return create_celery(
        replace(settings, broker_url=servers.redis.url(8), result_backend_url=servers.redis.url(9)),
        publisher=True,
    )


def queued(redis: Redis) -> list[dict[str, Any]]:
    """The saga lane's messages, oldest first (and the lane emptied)."""
    messages = []
    for raw in reversed(redis.lrange(names.SAGA_QUEUE, 0, -1)):
        message = json.loads(raw)
        _args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
        messages.append({"headers": message["headers"], "kwargs": kwargs, "embed": embed})
    redis.delete(names.SAGA_QUEUE)
    return messages


STARTED: list[UUID] = []


@pytest.fixture(autouse=True)
def forget_sagas(engine: Engine) -> Iterator[None]:
    """Remove this file's sagas after each test: no other test's sweep or relay meets
    a saga it has no definition of."""
    yield
    with engine.begin() as conn:
        conn.execute(delete(sagas).where(sagas.c.id.in_(STARTED)))
    STARTED.clear()


def start(engine: Engine, saga: Journey, **payload: Any) -> UUID:
    saga_id = uuid4()
    STARTED.append(saga_id)
    with engine.begin() as conn:
        stage_saga(
            conn,
            saga.definition,
            SagaStart(saga_id, saga_id, payload),
            deadline=timedelta(seconds=30),
        )
    return saga_id


def run(engine: Engine, saga: Journey, saga_id: UUID, *steps: str, **payload: Any) -> None:
    for step in steps:
        runner.run_step(engine, saga, saga_id, step, payload)


def row(engine: Engine, saga_id: UUID) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(sagas).where(sagas.c.id == saga_id)).one()


def has_entry(engine: Engine, saga_id: UUID) -> bool:
    with engine.connect() as conn:
        found = conn.execute(select(outbox.c.saga_id).where(outbox.c.saga_id == saga_id))
        return found.first() is not None


def ledger(engine: Engine, saga_id: UUID) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(saga_steps.c.step, saga_steps.c.status).where(saga_steps.c.saga_id == saga_id)
        )
        return {step: status for step, status in rows}


def overdue(engine: Engine, saga_id: UUID, *, created: timedelta = timedelta(0)) -> None:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            update(sagas)
            .where(sagas.c.id == saga_id)
            .values(deadline_at=now - timedelta(seconds=1), created_at=now - created)
        )


def test_each_stage_is_published_as_its_own_chord_or_plain_task_with_its_version(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    saga = Journey(version=2)
    saga_id = start(engine, saga)
    with engine.connect() as conn:
        assert conn.execute(
            select(sagas.c.version, sagas.c.stage).where(sagas.c.id == saga_id)
        ).one() == (2, 0)

    dispatch_saga(publisher, saga.definition, saga_id, {}, stage=0, join="chord")
    (seat,) = queued(redis)
    assert seat["headers"]["id"] == f"{saga_id}.{SEAT}"
    assert seat["headers"]["group"] is None and seat["embed"]["chord"] is None
    assert seat["kwargs"] == {"version": 2}

    dispatch_saga(publisher, saga.definition, saga_id, {}, stage=1, join="chord")
    room, car = queued(redis)
    for index, message in enumerate((room, car)):
        assert message["headers"]["group"] == f"{saga_id}.s1"
        assert message["headers"]["group_index"] == index
        assert message["kwargs"] == {"version": 2}
        body = message["embed"]["chord"]
        assert body["options"]["task_id"] == f"{saga_id}.complete.s1"
        assert (body["task"], body["args"]) == (names.COMPLETE_TRIP, [str(saga_id)])

    dispatch_saga(publisher, journey(1), saga_id, {}, stage=1, join="database")
    messages = queued(redis)
    assert [m["headers"]["group"] for m in messages] == [None, None]
    assert [m["kwargs"] for m in messages] == [{}, {}]  # version 1: no version sent


def test_a_completed_stage_moves_the_saga_on_under_its_lock_with_an_outbox_entry(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    saga = Journey()
    saga_id = start(engine, saga)
    with engine.begin() as conn:
        clear_entries(conn, [(saga_id, None)])  # the launch's own clear
    run(engine, saga, saga_id, SEAT)

    before = datetime.now(UTC)
    done = runner.complete(engine, saga, saga_id, retry_after=RETRY, deadline=timedelta(seconds=90))
    assert done.advanced_to == 1 and done.decision is not None and done.decision.advances
    moved = row(engine, saga_id)
    assert (moved.state, moved.stage) == ("RUNNING", 1)
    assert moved.deadline_at >= before + timedelta(seconds=89)
    assert has_entry(engine, saga_id)  # the relay publishes stage 1 if nobody does

    # A duplicate completion of stage 0 finds stage 1 without outcomes: nothing happens.
    with pytest.raises(runner.StepsPending):
        runner.complete(engine, saga, saga_id, retry_after=RETRY)
    assert row(engine, saga_id).stage == 1

    cleared: list[tuple[UUID, int]] = []
    assert dispatch_next_stage(publisher, done, lambda *entry: cleared.append(entry))
    assert [m["headers"]["id"] for m in queued(redis)] == [
        f"{saga_id}.{ROOM}",
        f"{saga_id}.{CAR}",
    ]
    assert cleared == [(saga_id, 1)]


def test_all_three_stages_applied_confirm_each_effect_once_in_stage_order(
    engine: Engine,
) -> None:
    saga = Journey()
    saga_id = start(engine, saga)
    for steps in ((SEAT,), (ROOM, CAR), (TICKET,)):
        run(engine, saga, saga_id, *steps)
        run(engine, saga, saga_id, *steps)  # redelivered: the recorded outcome
        done = runner.complete(engine, saga, saga_id, retry_after=RETRY)
    assert done.decision is not None and done.decision.state is SagaState.CONFIRMED
    assert saga.ran == [
        ("apply", SEAT),
        ("apply", ROOM),
        ("apply", CAR),
        ("apply", TICKET),
        ("confirm", ""),
    ]
    assert row(engine, saga_id).state == "CONFIRMED"


def test_a_refusal_in_stage_1_compensates_it_and_stage_0_latest_first_and_ends_there(
    engine: Engine,
) -> None:
    saga = Journey()
    saga_id = start(engine, saga, refuse=ROOM)
    run(engine, saga, saga_id, SEAT, refuse=ROOM)
    assert runner.complete(engine, saga, saga_id, retry_after=RETRY).advanced_to == 1
    run(engine, saga, saga_id, CAR, ROOM, refuse=ROOM)

    done = runner.complete(engine, saga, saga_id, retry_after=RETRY)
    assert done.decision is not None
    assert (done.decision.state, done.decision.reason) == (SagaState.CANCELLED, "refused_by_test")
    assert saga.ran[-3:] == [("undo", CAR), ("undo", SEAT), ("cancel", "refused_by_test")]
    assert ledger(engine, saga_id) == {
        SEAT: StepStatus.COMPENSATED,
        CAR: StepStatus.COMPENSATED,
        ROOM: StepStatus.REFUSED,
    }  # the ticket never ran
    assert runner.complete(engine, saga, saga_id, retry_after=RETRY).decision is None


def test_a_cancel_on_request_aborts_the_running_stage_and_undoes_the_earlier_ones(
    engine: Engine,
) -> None:
    saga = Journey()
    saga_id = start(engine, saga)
    run(engine, saga, saga_id, SEAT)
    runner.complete(engine, saga, saga_id, retry_after=RETRY)
    run(engine, saga, saga_id, ROOM)

    done = runner.cancel(engine, saga, saga_id, "cancelled_by_test", retry_after=RETRY)
    assert done.decision is not None and done.decision.compensate == (ROOM, SEAT)
    assert ledger(engine, saga_id)[CAR] == StepStatus.ABORTED
    run(engine, saga, saga_id, CAR)  # arriving late, it does nothing
    assert ("apply", CAR) not in saga.ran


def test_the_relay_publishes_the_running_stage_on_the_sagas_own_version(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    v1, v2 = Journey(version=1), Journey(version=2)
    saga_id = start(engine, v1)
    run(engine, v1, saga_id, SEAT)
    runner.complete(engine, v1, saga_id, retry_after=RETRY)  # stage 1, not published

    only_v2 = SagaRegistry([v2])
    relay_outbox(engine, publisher, only_v2, grace=timedelta(0))
    assert queued(redis) == [] and has_entry(engine, saga_id)  # left for a relay with v1

    with engine.begin() as conn:  # its lease ends
        conn.execute(
            update(outbox)
            .where(outbox.c.saga_id == saga_id)
            .values(created_at=datetime.now(UTC) - timedelta(hours=1))
        )
    assert relay_outbox(engine, publisher, SagaRegistry([v1, v2]), grace=timedelta(0)) >= 1
    published = [m for m in queued(redis) if m["headers"]["id"].startswith(str(saga_id))]
    assert [m["headers"]["id"] for m in published] == [f"{saga_id}.{ROOM}", f"{saga_id}.{CAR}"]
    assert [m["kwargs"] for m in published] == [{}, {}]
    assert not has_entry(engine, saga_id)


def test_clearing_an_earlier_stage_leaves_the_next_stages_entry(engine: Engine) -> None:
    saga = Journey()
    saga_id = start(engine, saga)
    run(engine, saga, saga_id, SEAT)
    runner.complete(engine, saga, saga_id, retry_after=RETRY)  # stage 1: a new entry
    with engine.begin() as conn:
        clear_entries(conn, [(saga_id, 0)])  # stage 0's clear, late
    assert has_entry(engine, saga_id)
    with engine.begin() as conn:
        clear_entries(conn, [(saga_id, 1)])
    assert not has_entry(engine, saga_id)


def test_the_sweeper_redrives_the_running_stage_then_moves_a_complete_one_on(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    saga = Journey()
    sagas_here = SagaRegistry([saga])
    saga_id = start(engine, saga)
    run(engine, saga, saga_id, SEAT)
    runner.complete(engine, saga, saga_id, retry_after=RETRY)
    run(engine, saga, saga_id, ROOM)
    queued(redis)

    overdue(engine, saga_id)  # the car's message was lost
    assert sweep_overdue(engine, publisher, sagas_here, POLICY).redriven == 1
    assert [m["headers"]["id"] for m in queued(redis)] == [f"{saga_id}.{ROOM}", f"{saga_id}.{CAR}"]

    run(engine, saga, saga_id, CAR)
    overdue(engine, saga_id)  # and then the stage's completion was lost
    assert sweep_overdue(engine, publisher, sagas_here, POLICY).completed == 1
    assert row(engine, saga_id).stage == 2
    assert [m["headers"]["id"] for m in queued(redis)] == [f"{saga_id}.{TICKET}"]
    assert not has_entry(engine, saga_id)


def test_past_the_business_timeout_the_sweeper_cancels_instead_of_moving_on(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    saga = Journey()
    saga_id = start(engine, saga)
    run(engine, saga, saga_id, SEAT)
    overdue(engine, saga_id, created=timedelta(hours=2))

    assert sweep_overdue(engine, publisher, SagaRegistry([saga]), POLICY).completed == 1
    over = row(engine, saga_id)
    assert (over.state, over.reason, over.stage) == ("CANCELLED", "timed_out", 0)
    assert saga.ran[-2:] == [("undo", SEAT), ("cancel", "timed_out")]
    assert queued(redis) == []


def test_the_sweeper_leaves_a_saga_whose_version_it_lacks(
    engine: Engine, publisher: Celery, redis: Redis
) -> None:
    saga_id = start(engine, Journey(version=2))
    overdue(engine, saga_id)
    report = sweep_overdue(engine, publisher, SagaRegistry([Journey(version=1)]), POLICY)
    assert (report.redriven, report.completed, report.failed) == (0, 0, 0)
    assert row(engine, saga_id).state == "RUNNING" and queued(redis) == []


def test_a_completion_runs_on_the_handlers_of_the_sagas_own_version(engine: Engine) -> None:
    v1, v2 = Journey(version=1), Journey(version=2)
    saga_id = start(engine, v1, refuse=SEAT)
    run(engine, v1, saga_id, SEAT, refuse=SEAT)

    with pytest.raises(UnknownSagaVersion, match="'journey' version 1 is not deployed"):
        runner.complete(engine, SagaRegistry([v2]), saga_id, retry_after=RETRY)
    done = runner.complete(engine, SagaRegistry([v1, v2]), saga_id, retry_after=RETRY)
    assert done.decision is not None and done.decision.state is SagaState.CANCELLED
    assert v1.ran == [("cancel", "refused_by_test")] and v2.ran == []
