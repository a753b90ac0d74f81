"""Operators' queries and actions on sagas, whatever they serve.

Queries: ``list_sagas`` (stuck first, keyset paging, each filter index-backed) and
``show_saga`` (the row, its ledger and timeline). Actions, each refusing with a reason
when the saga's state does not allow it (``SagaActionRefusedError``):

- ``retry``: a RUNNING saga's steps without an outcome are dispatched now (the steps that
  have one return it again: they are idempotent), counted as a redrive; a saga whose
  every step has an outcome is completed now instead;
- ``cancel``: a RUNNING saga is cancelled with ``operator_cancelled`` (``runner.cancel``:
  its applied steps compensated, the rest never take effect);
- ``retry_compensation``: a COMPENSATION_FAILED saga's compensation is run now; the
  answer says whether it ended CANCELLED or failed again, and with what error.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import ColumnElement, Connection, Engine, and_, select, tuple_

from config import tracing
from sagas import runner, store
from sagas.canvas import dispatch_saga
from sagas.engine import ACTIVE_STATES, TERMINAL_STATES, SagaState
from sagas.launch import clear_entries, dispatch_next_stage
from sagas.recovery import RecoveryPolicy
from sagas.runner import NEVER, SagaHandlers
from sagas.tables import saga_steps, sagas

#: The reason an operator's cancel records (the saga's handlers record it on their domain).
OPERATOR_CANCELLED = "operator_cancelled"
#: Most sagas one page lists.
MAX_PAGE = 1000
#: What a step with no outcome yet shows as.
PENDING = "PENDING"

#: Finds a saga's handlers by its name and definition version; raises LookupError.
HandlersOf = Callable[[str, int], SagaHandlers]

_s, _st = sagas.c, saga_steps.c


class SagaOperationError(Exception):
    """An operator's request about a saga that cannot be done."""


class SagaNotFoundError(SagaOperationError):
    """No saga has that id."""


class SagaActionRefusedError(SagaOperationError):
    """The saga's state does not allow the action; the message says why and what to do."""


class BadCursorError(SagaOperationError):
    """A paging cursor this module did not write."""


@dataclass(frozen=True)
class SagaQuery:
    """Which sagas to list, and from where."""

    states: tuple[SagaState, ...] = tuple(SagaState)
    name: str | None = None
    #: Only sagas accepted at least this long ago.
    older_than: timedelta | None = None
    limit: int = 50
    #: The previous page's ``next`` cursor.
    after: str | None = None


@dataclass(frozen=True)
class SagaRow:
    """One saga as a list shows it."""

    id: str
    name: str
    version: int
    #: The stage running now (0-based), or the last one that ran.
    stage: int
    state: str
    reason: str | None
    created_at: str
    deadline_at: str | None
    finished_at: str | None
    age_seconds: float
    #: Active and past its deadline, or left to an operator.
    stuck: bool
    redrives: int
    recovery_attempts: int
    #: Each step's ledger status (PENDING: no outcome yet), in declaration order.
    steps: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready primitives."""
        return asdict(self)


@dataclass(frozen=True)
class SagaPage:
    """A page of sagas, and the cursor of the next one (None: the last page)."""

    sagas: list[SagaRow]
    next: str | None


@dataclass(frozen=True)
class SagaDetail:
    """One saga in full: its row, ledger, timeline, error and trace."""

    saga: SagaRow
    error: str | None
    trace_id: str | None
    payload: dict[str, Any]
    ledger: list[dict[str, Any]]
    timeline: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready primitives."""
        return {
            **self.saga.to_dict(),
            "error": self.error,
            "trace_id": self.trace_id,
            "payload": self.payload,
            "ledger": self.ledger,
            "timeline": self.timeline,
        }


@dataclass(frozen=True)
class ActionResult:
    """What an action did, and where the saga stands after it."""

    saga_id: str
    action: str
    #: "redriven", "completed", "CANCELLED", "COMPENSATION_FAILED"...
    outcome: str
    state: str
    reason: str | None
    detail: str
    dispatched: list[str] = field(default_factory=list)
    compensated: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready primitives."""
        return asdict(self)


# Segments of a list, in order; each is one range of one index, so a page costs what it
# returns: left to an operator, then past the deadline (longest overdue first), then
# active on time (by deadline), all on ix_sagas_active_deadline; then finished ones, most
# recently finished first, on ix_sagas_finished.
_SEGMENTS = ("escalated", "overdue", "active", "finished")


def _segment(name: str, now: datetime) -> tuple[ColumnElement[bool], Any, bool]:
    """The segment's condition, its sort column, and whether it sorts descending."""
    active = _s.state.in_([s.value for s in ACTIVE_STATES])
    if name == "escalated":
        return and_(active, _s.deadline_at >= NEVER), _s.deadline_at, False
    if name == "overdue":
        return and_(active, _s.deadline_at < now), _s.deadline_at, False
    if name == "active":
        return and_(active, _s.deadline_at >= now, _s.deadline_at < NEVER), _s.deadline_at, False
    finished = _s.state.in_([s.value for s in TERMINAL_STATES])
    return finished, _s.finished_at, True


def _cursor(segment: int, key: datetime, saga_id: UUID) -> str:
    raw = json.dumps([segment, key.isoformat(), str(saga_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_cursor(text: str) -> tuple[int, datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        segment, key, saga_id = json.loads(raw)
        return int(segment), datetime.fromisoformat(key), UUID(saga_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise BadCursorError(f"not a cursor of this list: {text!r}") from exc


_ROW = (
    _s.id,
    _s.name,
    _s.version,
    _s.stage,
    _s.state,
    _s.reason,
    _s.created_at,
    _s.deadline_at,
    _s.finished_at,
    _s.redrives,
    _s.recovery_attempts,
)


def list_sagas(engine: Engine, query: SagaQuery, handlers: HandlersOf | None = None) -> SagaPage:
    """A page of sagas matching ``query``, stuck ones first (see ``_SEGMENTS``)."""
    now = datetime.now(UTC)
    limit = max(1, min(query.limit, MAX_PAGE))
    start = _read_cursor(query.after) if query.after else None
    states = [state.value for state in query.states]
    found: list[tuple[int, Any]] = []
    with engine.connect() as conn:
        for number, name in enumerate(_SEGMENTS):
            if start is not None and number < start[0]:
                continue
            if len(found) > limit:
                break
            wanted = TERMINAL_STATES if name == "finished" else ACTIVE_STATES
            if not wanted & set(query.states):
                continue
            condition, key, descending = _segment(name, now)
            select_page = select(*_ROW).where(condition, _s.state.in_(states))
            if query.name:
                select_page = select_page.where(_s.name == query.name)
            if query.older_than is not None:
                select_page = select_page.where(_s.created_at <= now - query.older_than)
            if start is not None and number == start[0]:
                after = tuple_(key, _s.id)
                mark = tuple_(start[1], start[2])
                select_page = select_page.where(after < mark if descending else after > mark)
            order = (key.desc(), _s.id.desc()) if descending else (key, _s.id)
            rows = conn.execute(select_page.order_by(*order).limit(limit + 1 - len(found))).all()
            found += [(number, row) for row in rows]
        ledgers = _ledgers(conn, [row.id for _, row in found[:limit]])
    following = None
    if len(found) > limit:
        number, last = found[limit - 1]
        key = last.finished_at if _SEGMENTS[number] == "finished" else last.deadline_at
        following = _cursor(number, key, last.id)
    page = [_saga_row(row, ledgers.get(row.id, {}), now, handlers) for _, row in found[:limit]]
    return SagaPage(page, following)


def _ledgers(conn: Connection, saga_ids: Sequence[UUID]) -> dict[UUID, dict[str, str]]:
    if not saga_ids:
        return {}
    ledgers: dict[UUID, dict[str, str]] = {}
    rows = conn.execute(
        select(_st.saga_id, _st.step, _st.status)
        .where(_st.saga_id.in_(list(saga_ids)))
        .order_by(_st.started_at)
    )
    for row in rows:
        ledgers.setdefault(row.saga_id, {})[row.step] = row.status
    return ledgers


def _steps_of(name: str, version: int, handlers: HandlersOf | None) -> tuple[str, ...]:
    if handlers is None:
        return ()
    try:
        return handlers(name, version).definition.step_names
    except LookupError:
        return ()


def _saga_row(
    row: Any, ledger: dict[str, str], now: datetime, handlers: HandlersOf | None
) -> SagaRow:
    declared = _steps_of(row.name, row.version, handlers)
    steps = {step: ledger.get(step, PENDING) for step in declared}
    steps.update(ledger)
    active = row.state in {state.value for state in ACTIVE_STATES}
    stuck = active and (row.deadline_at < now or row.deadline_at >= NEVER)
    return SagaRow(
        id=str(row.id),
        name=row.name,
        version=row.version,
        stage=row.stage,
        state=row.state,
        reason=row.reason,
        created_at=row.created_at.isoformat(),
        deadline_at=row.deadline_at.isoformat() if active and row.deadline_at < NEVER else None,
        finished_at=row.finished_at.isoformat() if row.finished_at else None,
        age_seconds=round(((row.finished_at or now) - row.created_at).total_seconds(), 3),
        stuck=stuck,
        redrives=row.redrives,
        recovery_attempts=row.recovery_attempts,
        steps=steps,
    )


def show_saga(engine: Engine, saga_id: UUID, handlers: HandlersOf | None = None) -> SagaDetail:
    """One saga in full; SagaNotFoundError if there is none with that id."""
    now = datetime.now(UTC)
    with engine.connect() as conn:
        row = conn.execute(
            select(*_ROW, _s.error, _s.payload, _s.trace_context).where(_s.id == saga_id)
        ).first()
        if row is None:
            raise SagaNotFoundError(f"no saga {saga_id}")
        steps = conn.execute(
            select(saga_steps).where(_st.saga_id == saga_id).order_by(_st.started_at, _st.step)
        ).all()
    ledger = [
        {
            "step": step.step,
            "status": step.status,
            "reason": step.reason,
            "attempts": step.attempts,
            "started_at": step.started_at.isoformat(),
            "finished_at": step.finished_at.isoformat(),
            "compensated_at": step.compensated_at.isoformat() if step.compensated_at else None,
        }
        for step in steps
    ]
    summary = _saga_row(row, {step.step: step.status for step in steps}, now, handlers)
    return SagaDetail(
        summary,
        row.error,
        tracing.trace_id_of(row.trace_context),
        dict(row.payload),
        ledger,
        _timeline(row, steps),
    )


def _timeline(row: Any, steps: Sequence[Any]) -> list[dict[str, Any]]:
    """Accepted, each step started and finished (or aborted, compensated), decided."""
    events: list[tuple[datetime, int, dict[str, Any]]] = [
        (row.created_at, 0, {"event": "accepted"})
    ]
    for step in steps:
        if step.status == "ABORTED":
            events.append(
                (
                    step.finished_at,
                    2,
                    {"event": "aborted", "step": step.step, "reason": step.reason},
                )
            )
            continue
        events.append((step.started_at, 1, {"event": "started", "step": step.step}))
        outcome = "APPLIED" if step.status == "COMPENSATED" else step.status
        finished = {"event": "finished", "step": step.step, "status": outcome}
        events.append((step.finished_at, 2, {**finished, "reason": step.reason}))
        if step.compensated_at is not None:
            events.append((step.compensated_at, 3, {"event": "compensated", "step": step.step}))
    if row.finished_at is not None:
        decided = {"event": "decided", "state": row.state, "reason": row.reason}
        events.append((row.finished_at, 4, decided))
    elif row.state == SagaState.COMPENSATION_FAILED:
        events.append((row.deadline_at, 4, {"event": "compensation_failed", "error": row.error}))
    events.sort(key=lambda event: (event[0], event[1]))
    return [{"at": at.isoformat(), **event} for at, _, event in events]


def describe_step(conn: Connection, saga_id: UUID, step: str) -> str:
    """What the ledger says of one step of a saga, in a sentence an operator reads."""
    row = conn.execute(select(saga_steps).where(_st.saga_id == saga_id, _st.step == step)).first()
    if row is None:
        return f"step {step} has no outcome in the ledger: its effect never took place"
    why = f" ({row.reason})" if row.reason else ""
    at = row.finished_at.isoformat()
    if row.status == "COMPENSATED":
        return (
            f"step {step} was APPLIED at {at} then COMPENSATED at"
            f" {row.compensated_at.isoformat()}: its effect was undone"
        )
    if row.status == "APPLIED":
        return f"step {step} was recorded APPLIED at {at}: its effect stands"
    return f"step {step} was recorded {row.status}{why} at {at}: its effect never took place"


class SagaTools:
    """The actions on one saga, for the operators' command line and API."""

    def __init__(
        self,
        engine: Engine,
        app: Celery,
        handlers: HandlersOf,
        policy: RecoveryPolicy,
        escalate: runner.Escalate | None = None,
    ) -> None:
        self.engine = engine
        self.app = app
        self.handlers = handlers
        self.policy = policy
        self.escalate = escalate

    def list(self, query: SagaQuery) -> SagaPage:
        """See ``list_sagas``."""
        return list_sagas(self.engine, query, self.handlers)

    def show(self, saga_id: UUID) -> SagaDetail:
        """See ``show_saga``."""
        return show_saga(self.engine, saga_id, self.handlers)

    def _read(self, saga_id: UUID) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_ROW, _s.payload, _s.trace_context, _s.error).where(_s.id == saga_id)
            ).first()
        if row is None:
            raise SagaNotFoundError(f"no saga {saga_id}")
        return row

    def _saga(self, row: Any) -> SagaHandlers:
        try:
            return self.handlers(row.name, row.version)
        except LookupError as exc:
            raise SagaActionRefusedError(
                f"saga {row.id} is a {row.name!r} saga of version {row.version}, which this"
                " process does not have: run the action where it is deployed"
            ) from exc

    def _refuse(self, row: Any, wanted: SagaState, action: str) -> None:
        if row.state == wanted:
            return
        why = f" ({row.reason})" if row.reason else ""
        when = f" at {row.finished_at.isoformat()}" if row.finished_at else ""
        hint = {
            SagaState.RUNNING: "it is still running: retry its steps or cancel it instead",
            SagaState.COMPENSATION_FAILED: "its cancellation is under way and its compensation"
            " failed: use retry-compensation",
        }.get(SagaState(row.state), "it is final: nothing to do")
        raise SagaActionRefusedError(
            f"saga {row.id} is {row.state}{why}{when}, not {wanted}: cannot {action}; {hint}"
        )

    def _result(
        self, saga_id: UUID, action: str, outcome: str, detail: str, **more: Any
    ) -> ActionResult:
        row = self._read(saga_id)
        error = row.error if row.state == SagaState.COMPENSATION_FAILED else None
        return ActionResult(
            str(saga_id), action, outcome, row.state, row.reason, detail, error=error, **more
        )

    def retry(self, saga_id: UUID) -> ActionResult:
        """Dispatch the running stage of a RUNNING saga again, for its steps without an
        outcome (those with one return it again: steps are idempotent), counting a
        redrive; when every step of the stage has an outcome, complete the stage now."""
        row = self._read(saga_id)
        self._refuse(row, SagaState.RUNNING, "retry its steps")
        saga = self._saga(row)
        stage = saga.definition.stages[row.stage]
        with self.engine.connect() as conn:
            ledger = store.read_ledger(conn, saga_id)
        every = [step.name for step in stage.steps]
        missing = [step for step in every if step not in ledger]
        if not missing:
            return self._complete_stage(saga, saga_id)
        with tracing.resumed(row.trace_context, "operator retry", saga_id=saga_id):
            dispatch_saga(self.app, saga.definition, saga_id, row.payload, stage=row.stage)
        now = datetime.now(UTC)
        expires_at = row.created_at + self.policy.timeout
        next_look = min(now + self.policy.redrive_wait(row.redrives + 1), max(expires_at, now))
        with self.engine.begin() as conn:
            store.count_redrive(conn, saga_id, next_look)
        return self._result(
            saga_id,
            "retry",
            "redriven",
            f"stage {row.stage} dispatched again: {', '.join(missing)} had no outcome",
            dispatched=every,
        )

    def _complete_stage(self, saga: SagaHandlers, saga_id: UUID) -> ActionResult:
        done = runner.complete(
            self.engine,
            saga,
            saga_id,
            retry_after=self.policy.compensation_wait,
            running_only=True,
            escalate=self.escalate,
            deadline=self.policy.deadline,
        )
        if done.decision is None:
            return self._result(saga_id, "retry", "decided", "decided meanwhile by another")
        if done.advanced_to is not None:
            dispatch_next_stage(self.app, done, self._clear_outbox)
            return self._result(
                saga_id,
                "retry",
                "advanced",
                f"its stage had every outcome: moved on to stage {done.advanced_to}, dispatched",
                dispatched=[step.name for step in saga.definition.stages[done.advanced_to].steps],
            )
        return self._result(
            saga_id,
            "retry",
            "completed",
            "every step had an outcome: completed now",
            compensated=list(done.decision.compensate),
        )

    def _clear_outbox(self, saga_id: UUID, stage: int) -> None:
        with self.engine.begin() as conn:
            clear_entries(conn, [(saga_id, stage)])

    def cancel(self, saga_id: UUID) -> ActionResult:
        """Cancel a RUNNING saga with ``operator_cancelled``: its applied steps are
        compensated, its steps without an outcome never take effect."""
        row = self._read(saga_id)
        self._refuse(row, SagaState.RUNNING, "cancel it")
        saga = self._saga(row)
        done = runner.cancel(
            self.engine,
            saga,
            saga_id,
            OPERATOR_CANCELLED,
            retry_after=self.policy.compensation_wait,
            escalate=self.escalate,
        )
        if done.decision is None:
            self._refuse(self._read(saga_id), SagaState.RUNNING, "cancel it")
            raise SagaActionRefusedError(f"saga {saga_id} was decided first")
        state = done.decision.state
        compensated = list(done.decision.compensate)
        if state is SagaState.COMPENSATION_FAILED:
            detail = "cancelled, but its compensation failed: the sweeper retries it"
        else:
            detail = f"cancelled; compensated: {', '.join(compensated) or 'nothing'}"
        return self._result(saga_id, "cancel", state.value, detail, compensated=compensated)

    def retry_compensation(self, saga_id: UUID) -> ActionResult:
        """Run a COMPENSATION_FAILED saga's compensation now: it ends CANCELLED, or
        fails again (the answer carries the error; the sweeper's backoff goes on)."""
        row = self._read(saga_id)
        self._refuse(row, SagaState.COMPENSATION_FAILED, "retry its compensation")
        saga = self._saga(row)
        done = runner.complete(
            self.engine,
            saga,
            saga_id,
            retry_after=self.policy.compensation_wait,
            escalate=self.escalate,
        )
        if done.decision is None:
            return self._result(saga_id, "retry-compensation", "decided", "finished meanwhile")
        state = done.decision.state
        compensated = list(done.decision.compensate)
        if state is SagaState.COMPENSATION_FAILED:
            then = "left to an operator" if done.escalated else "the sweeper tries again later"
            detail = f"the compensation failed again ({done.attempts} failures): {then}"
        else:
            detail = f"compensated: {', '.join(compensated) or 'nothing'}"
        return self._result(
            saga_id, "retry-compensation", state.value, detail, compensated=compensated
        )
