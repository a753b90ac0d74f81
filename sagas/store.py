"""Saga persistence: instances, the step ledger and the outbox, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, insert, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from sagas.engine import SagaState, StepOutcome, StepStatus
from sagas.tables import outbox, saga_steps, sagas


@dataclass(frozen=True)
class LockedSaga:
    """A saga row held under lock, with its ledger."""

    saga_id: UUID
    name: str
    state: SagaState
    payload: Mapping[str, Any]
    outcomes: Mapping[str, StepOutcome]


def create_saga(
    conn: Connection,
    saga_id: UUID,
    name: str,
    payload: Mapping[str, Any],
    *,
    now: datetime,
    deadline_at: datetime,
) -> None:
    """Record a new running saga and its outbox entry."""
    conn.execute(
        insert(sagas).values(
            id=saga_id,
            name=name,
            state=SagaState.RUNNING,
            payload=dict(payload),
            deadline_at=deadline_at,
            created_at=now,
        )
    )
    conn.execute(insert(outbox).values(saga_id=saga_id, created_at=now))


def record_step(
    conn: Connection, saga_id: UUID, outcome: StepOutcome, *, started_at: datetime, now: datetime
) -> bool:
    """Write the step's outcome to the ledger; False if the ledger already had one.

    A concurrent writer of the same (saga, step) makes this wait for its commit."""
    written = conn.execute(
        pg_insert(saga_steps)
        .values(
            saga_id=saga_id,
            step=outcome.step,
            status=outcome.status,
            reason=outcome.reason,
            started_at=started_at,
            finished_at=now,
        )
        .on_conflict_do_nothing()
        .returning(literal(1))
    ).first()
    return written is not None


def read_step(conn: Connection, saga_id: UUID, step: str) -> StepOutcome:
    """The ledger's outcome of one step (which must exist)."""
    row = conn.execute(
        select(saga_steps.c.status, saga_steps.c.reason).where(
            saga_steps.c.saga_id == saga_id, saga_steps.c.step == step
        )
    ).one()
    return StepOutcome(step, StepStatus(row.status), row.reason)


def lock_saga(conn: Connection, saga_id: UUID) -> LockedSaga | None:
    """Lock the saga row (decisions on one saga run one at a time) and read its ledger."""
    rows = conn.execute(
        select(
            sagas.c.name,
            sagas.c.state,
            sagas.c.payload,
            saga_steps.c.step,
            saga_steps.c.status,
            saga_steps.c.reason,
        )
        .outerjoin(saga_steps, saga_steps.c.saga_id == sagas.c.id)
        .where(sagas.c.id == saga_id)
        # NO KEY UPDATE: steps inserting ledger rows (a key share on the saga) don't wait.
        .with_for_update(of=sagas, key_share=True)
    ).all()
    if not rows:
        return None
    first = rows[0]
    outcomes = {
        row.step: StepOutcome(row.step, StepStatus(row.status), row.reason)
        for row in rows
        if row.step is not None
    }
    return LockedSaga(saga_id, first.name, SagaState(first.state), first.payload, outcomes)


def mark_compensated(conn: Connection, saga_id: UUID, steps: Iterable[str], now: datetime) -> None:
    """Record that these applied steps were undone."""
    steps = list(steps)
    if not steps:
        return
    done = conn.execute(
        update(saga_steps)
        .where(saga_steps.c.saga_id == saga_id)
        .where(saga_steps.c.step.in_(steps))
        .where(saga_steps.c.status == StepStatus.APPLIED)
        .values(status=StepStatus.COMPENSATED, compensated_at=now)
    )
    if done.rowcount != len(steps):
        raise RuntimeError(f"saga {saga_id}: compensated {done.rowcount} of steps {steps}")


def finish_saga(
    conn: Connection, saga_id: UUID, state: SagaState, reason: str | None, now: datetime
) -> None:
    """Move a running saga to its final state."""
    conn.execute(
        update(sagas)
        .where(sagas.c.id == saga_id)
        .where(sagas.c.state == SagaState.RUNNING)
        .values(state=state, reason=reason, finished_at=now)
    )
