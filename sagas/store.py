"""Saga persistence: instances, the step ledger and the outbox, inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, bindparam, case, delete, insert, literal, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from config.database import prepared
from sagas.engine import ACTIVE_STATES, SagaState, StepOutcome, StepStatus
from sagas.tables import outbox, saga_steps, sagas


@dataclass(frozen=True)
class LockedSaga:
    """A saga row held under lock, with its ledger."""

    saga_id: UUID
    name: str
    state: SagaState
    reason: str | None
    payload: Mapping[str, Any]
    outcomes: Mapping[str, StepOutcome]
    redrives: int = 0
    created_at: datetime | None = None
    #: Times the sweeper took it up; for a saga whose compensation failed, how many
    #: times the compensation failed.
    recovery_attempts: int = 0
    #: The W3C traceparent stored with the saga (config.tracing), if any.
    trace_context: str | None = None
    #: The definition version it runs on, and the index of its running stage.
    version: int = 1
    stage: int = 0


_s, _st = sagas.c, saga_steps.c

#: A new saga and its outbox entry, in one statement.
_CREATE = prepared(
    "create_saga",
    insert(outbox).from_select(
        ["saga_id", "created_at"],
        select(
            insert(sagas)
            .values(
                id=bindparam("saga_id"),
                name=bindparam("name"),
                version=bindparam("version"),
                state=SagaState.RUNNING.value,
                payload=bindparam("payload", type_=JSONB),
                deadline_at=bindparam("deadline_at"),
                created_at=bindparam("now"),
                trace_context=bindparam("trace_context"),
            )
            .returning(_s.id)
            .cte("new_saga")
            .c.id,
            bindparam("now"),
        ),
    ),
)
_RECORD_STEP = prepared(
    "record_step",
    pg_insert(saga_steps)
    .values(
        saga_id=bindparam("saga_id"),
        step=bindparam("step"),
        status=bindparam("status"),
        reason=bindparam("reason"),
        started_at=bindparam("started_at"),
        finished_at=bindparam("finished_at"),
        attempts=bindparam("attempts"),
    )
    .on_conflict_do_nothing()
    .returning(literal(1)),
)
_READ_STEP = select(_st.status, _st.reason).where(
    _st.saga_id == bindparam("saga_id"), _st.step == bindparam("step")
)
_REDELIVERED = (
    update(saga_steps)
    # Not "saga_id" / "step": an UPDATE reserves its columns' names for SET values.
    .where(_st.saga_id == bindparam("of_saga"), _st.step == bindparam("of_step"))
    .values(attempts=_st.attempts + 1)
    .returning(_st.status, _st.reason)
)
_LOCK = prepared(
    "lock_saga",
    select(
        _s.name,
        _s.version,
        _s.stage,
        _s.state,
        _s.reason,
        _s.payload,
        _s.redrives,
        _s.created_at,
        _s.recovery_attempts,
        _s.trace_context,
        _st.step,
        _st.status,
        _st.reason.label("step_reason"),
    )
    .outerjoin(saga_steps, _st.saga_id == _s.id)
    .where(_s.id == bindparam("saga_id"))
    # NO KEY UPDATE: steps inserting ledger rows (a key share on the saga) don't wait.
    .with_for_update(of=sagas, key_share=True),
)
#: The saga row alone, locked as ``_LOCK`` locks it (a step sent alone takes it first:
#: see ``lock_saga_first``).
_LOCK_ROW = prepared(
    "lock_saga_row",
    select(
        _s.name,
        _s.version,
        _s.stage,
        _s.state,
        _s.reason,
        _s.payload,
        _s.redrives,
        _s.created_at,
        _s.recovery_attempts,
        _s.trace_context,
    )
    .where(_s.id == bindparam("saga_id"))
    .with_for_update(of=sagas, key_share=True),
)
_LEDGER = prepared(
    "saga_ledger",
    select(_st.step, _st.status, _st.reason).where(_st.saga_id == bindparam("saga_id")),
)
_FINISH = prepared(
    "finish_saga",
    update(sagas)
    .where(_s.id == bindparam("saga_id"))
    .where(_s.state.in_([state.value for state in ACTIVE_STATES]))
    .values(
        state=bindparam("state"),
        reason=bindparam("reason"),
        error=None,
        finished_at=bindparam("now"),
    ),
)


def create_saga(
    conn: Connection,
    saga_id: UUID,
    name: str,
    payload: Mapping[str, Any],
    *,
    now: datetime,
    deadline_at: datetime,
    trace_context: str | None = None,
    version: int = 1,
) -> None:
    """Record a new running saga of that definition version, at its first stage, and
    its outbox entry (``trace_context``: the W3C traceparent its later dispatches join,
    if traces are on)."""
    conn.execute(
        _CREATE,
        {
            "saga_id": saga_id,
            "name": name,
            "version": version,
            "payload": dict(payload),
            "deadline_at": deadline_at,
            "now": now,
            "trace_context": trace_context,
        },
    )


def record_step(
    conn: Connection,
    saga_id: UUID,
    outcome: StepOutcome,
    *,
    started_at: datetime,
    now: datetime,
    attempts: int = 1,
) -> bool:
    """Write the step's outcome to the ledger; False if the ledger already had one.

    A concurrent writer of the same (saga, step) makes this wait for its commit."""
    written = conn.execute(
        _RECORD_STEP,
        {
            "saga_id": saga_id,
            "step": outcome.step,
            "status": outcome.status.value,
            "reason": outcome.reason,
            "started_at": started_at,
            "finished_at": now,
            "attempts": attempts,
        },
    ).first()
    return written is not None


def read_step(conn: Connection, saga_id: UUID, step: str) -> StepOutcome:
    """The ledger's outcome of one step (which must exist)."""
    row = conn.execute(_READ_STEP, {"saga_id": saga_id, "step": step}).one()
    return StepOutcome(step, StepStatus(row.status), row.reason)


def count_redelivery(conn: Connection, saga_id: UUID, step: str) -> StepOutcome:
    """Note that the step ran once more, and return its recorded outcome."""
    row = conn.execute(_REDELIVERED, {"of_saga": saga_id, "of_step": step}).one()
    return StepOutcome(step, StepStatus(row.status), row.reason)


def lock_saga(conn: Connection, saga_id: UUID) -> LockedSaga | None:
    """Lock the saga row (decisions on one saga run one at a time) and read its ledger,
    in one query."""
    rows = conn.execute(_LOCK, {"saga_id": saga_id}).all()
    if not rows:
        return None
    first = rows[0]
    outcomes = {
        row.step: StepOutcome(row.step, StepStatus(row.status), row.step_reason)
        for row in rows
        if row.step is not None
    }
    return LockedSaga(
        saga_id,
        first.name,
        SagaState(first.state),
        first.reason,
        first.payload,
        outcomes,
        first.redrives,
        first.created_at,
        first.recovery_attempts,
        first.trace_context,
        version=first.version,
        stage=first.stage,
    )


def lock_saga_first(conn: Connection, saga_id: UUID) -> LockedSaga | None:
    """Lock the saga row as ``lock_saga`` does, then read its ledger: two statements, so
    that the ledger is read after the lock is granted (one statement's snapshot is taken
    before it waits for the lock, and would miss the outcome that the lock's holder just
    committed). For a step that takes the lock before its effect."""
    first = conn.execute(_LOCK_ROW, {"saga_id": saga_id}).first()
    if first is None:
        return None
    return LockedSaga(
        saga_id,
        first.name,
        SagaState(first.state),
        first.reason,
        first.payload,
        read_ledger(conn, saga_id),
        first.redrives,
        first.created_at,
        first.recovery_attempts,
        first.trace_context,
        version=first.version,
        stage=first.stage,
    )


def read_ledger(conn: Connection, saga_id: UUID) -> dict[str, StepOutcome]:
    """Every recorded step outcome of the saga."""
    rows = conn.execute(_LEDGER, {"saga_id": saga_id}).all()
    return {row.step: StepOutcome(row.step, StepStatus(row.status), row.reason) for row in rows}


def overdue_sagas(conn: Connection, now: datetime, limit: int) -> list[UUID]:
    """Active sagas past their deadline, oldest deadline first."""
    return list(
        conn.execute(
            select(sagas.c.id)
            .where(sagas.c.state.in_(ACTIVE_STATES))
            .where(sagas.c.deadline_at < now)
            .order_by(sagas.c.deadline_at)
            .limit(limit)
        ).scalars()
    )


def claim_overdue(
    conn: Connection, saga_id: UUID, now: datetime, next_deadline: datetime
) -> LockedSaga | None:
    """Take an overdue saga up: push its deadline and count the attempt.

    None when it is no longer overdue (finished, or another sweeper took it). Commit
    before acting on it, so a crash while acting still counts the attempt."""
    claimed = conn.execute(
        update(sagas)
        .where(sagas.c.id == saga_id)
        .where(sagas.c.state.in_(ACTIVE_STATES))
        .where(sagas.c.deadline_at < now)
        .values(
            deadline_at=next_deadline,
            # A saga whose compensation failed counts its failed tries instead (those
            # are counted when they fail: a try cut short by a transient fault is not).
            recovery_attempts=case(
                (sagas.c.state == SagaState.COMPENSATION_FAILED, sagas.c.recovery_attempts),
                else_=sagas.c.recovery_attempts + 1,
            ),
        )
        .returning(
            sagas.c.name,
            sagas.c.state,
            sagas.c.reason,
            sagas.c.payload,
            sagas.c.redrives,
            sagas.c.created_at,
            sagas.c.recovery_attempts,
            sagas.c.trace_context,
            sagas.c.version,
            sagas.c.stage,
        )
    ).first()
    if claimed is None:
        return None
    return LockedSaga(
        saga_id,
        claimed.name,
        SagaState(claimed.state),
        claimed.reason,
        claimed.payload,
        read_ledger(conn, saga_id),
        claimed.redrives,
        claimed.created_at,
        claimed.recovery_attempts,
        claimed.trace_context,
        claimed.version,
        claimed.stage,
    )


def advance_saga(
    conn: Connection, saga_id: UUID, stage: int, *, now: datetime, deadline_at: datetime
) -> None:
    """Move a running saga on to ``stage``, to be looked at by ``deadline_at``, with an
    outbox entry (due now) so that the relay dispatches the stage if nobody else does."""
    conn.execute(
        update(sagas)
        .where(sagas.c.id == saga_id)
        .where(sagas.c.state == SagaState.RUNNING)
        .values(stage=stage, deadline_at=deadline_at)
    )
    conn.execute(
        pg_insert(outbox)
        .values(saga_id=saga_id, created_at=now)
        .on_conflict_do_update(index_elements=[outbox.c.saga_id], set_={"created_at": now})
    )


def clear_outbox(conn: Connection, saga_ids: Iterable[UUID]) -> None:
    """Remove the outbox entries of these sagas (their running stage was dispatched)."""
    conn.execute(delete(outbox).where(outbox.c.saga_id.in_(list(saga_ids))))


def count_redrive(conn: Connection, saga_id: UUID, next_deadline: datetime) -> None:
    """Record that the saga's steps were dispatched again, and when to look next."""
    conn.execute(
        update(sagas)
        .where(sagas.c.id == saga_id)
        .where(sagas.c.state == SagaState.RUNNING)
        .values(redrives=sagas.c.redrives + 1, deadline_at=next_deadline)
    )


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
    """Move an active saga to its final state."""
    conn.execute(_FINISH, {"saga_id": saga_id, "state": state.value, "reason": reason, "now": now})


def mark_compensation_failed(
    conn: Connection, saga_id: UUID, reason: str, error: str, retry_at: datetime, attempts: int
) -> None:
    """Record that the saga's compensation failed for the ``attempts``-th time, and when
    to try it again."""
    conn.execute(
        update(sagas)
        .where(sagas.c.id == saga_id)
        .where(sagas.c.state.in_(ACTIVE_STATES))
        .values(
            state=SagaState.COMPENSATION_FAILED,
            reason=reason,
            error=error,
            deadline_at=retry_at,
            recovery_attempts=attempts,
        )
    )
