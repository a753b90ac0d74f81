"""Running a saga's steps and its completions, each exactly once in effect.

A step's effect and its ledger row commit in one transaction; a redelivered step finds
its row, rolls its repeated effect back and returns the recorded outcome, so the chord
sees the identical result. Completion locks the saga row, decides the running stage
from the ledger, and moves the saga on to its next stage, confirms it, or compensates
in one transaction; a second completion of the same stage finds the saga moved on (its
next stage's steps have no outcome yet: StepsPending) or final.
A completion that cannot be carried out is never dropped: a failed confirmation turns
into a cancellation, and a failed compensation leaves the saga COMPENSATION_FAILED,
with its error, to be tried again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import Connection, Engine

from config.database import transaction
from config.failpoints import failpoint
from config.faults import is_transient
from sagas import store
from sagas.definition import SagaDefinition, UnknownSagaVersion
from sagas.engine import (
    CONFIRMATION_FAILED,
    TERMINAL_STATES,
    Decision,
    SagaState,
    StepOutcome,
    StepStatus,
    decide,
)
from sagas.store import LockedSaga

logger = logging.getLogger(__name__)


class SagaHandlers(Protocol):
    """What a concrete saga supplies to the runner: its definition and its effects."""

    definition: SagaDefinition

    def apply(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> str | None:
        """Perform the step; return None when applied, or the reason it was refused."""

    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Undo an applied step."""

    def confirm(self, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Make the saga's effects final (every step applied)."""

    def cancel(self, conn: Connection, payload: Mapping[str, Any], reason: str) -> None:
        """Record the saga's failure (its applied steps were compensated)."""

    def compensation_failed(
        self, conn: Connection, payload: Mapping[str, Any], reason: str, problem: str
    ) -> None:
        """Record that the applied steps could not be undone (yet). ``problem`` is a
        short, stable text fit for clients (the error's class and a fixed sentence)."""


class SagaLookup(Protocol):
    """Finds a saga's handlers by its name and version (``sagas.registry.SagaRegistry``)."""

    def get(self, name: str, version: int = 1) -> SagaHandlers:
        """The handlers of that saga version; UnknownSagaVersion if not known here."""


#: The handlers of one saga, or a lookup that finds them by the saga row's name and
#: version once the row is locked.
Sagas = SagaHandlers | SagaLookup


def handlers_for(saga: Sagas, locked: LockedSaga) -> SagaHandlers:
    """The handlers that run this saga row: found by its name and version, or the ones
    given, which must be of its name and version."""
    definition = getattr(saga, "definition", None)
    if not isinstance(definition, SagaDefinition):  # a lookup (its .definition is a method)
        return saga.get(locked.name, locked.version)  # type: ignore[union-attr]
    if (definition.name, definition.version) != (locked.name, locked.version):
        raise UnknownSagaVersion(locked.name, locked.version)
    return saga  # type: ignore[return-value]


class StepsPending(Exception):
    """The saga cannot be decided yet: some steps of its running stage have no outcome."""


class _AlreadyRecorded(Exception):
    """The ledger already holds this step's outcome: roll the repeated effect back."""


class _DecisionFailed(Exception):
    """Carrying out a decision failed (not transiently); its transaction rolled back."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision)
        self.decision = decision


def run_step(
    engine: Engine,
    saga: SagaHandlers,
    saga_id: UUID,
    step: str,
    payload: Mapping[str, Any],
    *,
    attempt: int = 1,
    delay: float = 0.0,
) -> StepOutcome:
    """Perform one step once; on any later delivery, return the recorded outcome.

    ``attempt`` is the task's try (1, then 2 after one retry...), recorded with the
    outcome; each later delivery adds one."""
    started_at = datetime.now(UTC)
    if delay:
        time.sleep(delay)  # test-only (Settings.step_delay_seconds)
    try:
        with transaction(engine) as conn:
            reason = saga.apply(step, conn, payload)
            status = StepStatus.APPLIED if reason is None else StepStatus.REFUSED
            outcome = StepOutcome(step, status, reason)
            now = datetime.now(UTC)
            recorded = store.record_step(
                conn, saga_id, outcome, started_at=started_at, now=now, attempts=attempt
            )
            if not recorded:
                raise _AlreadyRecorded
            failpoint("step.before_commit", step)
    except _AlreadyRecorded:
        with engine.begin() as conn:
            outcome = store.count_redelivery(conn, saga_id, step)
        logger.info("saga %s step %s was already recorded: %s", saga_id, step, outcome.status)
    failpoint("step.after_commit", step)
    return outcome


def abort_step(engine: Engine, saga_id: UUID, step: str, reason: str) -> StepOutcome:
    """Record that a step will never take effect, unless it already has an outcome;
    return the ledger's outcome either way. A late delivery of the step then does nothing."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        store.record_step(
            conn, saga_id, StepOutcome(step, StepStatus.ABORTED, reason), started_at=now, now=now
        )
        return store.read_step(conn, saga_id, step)


@dataclass(frozen=True)
class Completion:
    """What completing a saga's running stage did: its decision (which may be to go on
    to the next stage), or None if it was already final."""

    decision: Decision | None
    #: When the saga was accepted (for its duration), if it was decided now.
    created_at: datetime | None = None
    #: For a compensation that failed: how many times it has failed so far...
    attempts: int = 0
    #: ... and whether it is now left to an operator (no more automatic tries).
    escalated: bool = False
    saga_id: UUID | None = None
    #: The stage the saga moved on to: the caller dispatches it (``sagas.launch
    #: .dispatch_next_stage``; its outbox entry covers a dispatch that does not happen).
    advanced_to: int | None = None
    #: The definition the saga runs on, and its payload (to dispatch the next stage).
    definition: SagaDefinition | None = None
    payload: Mapping[str, Any] | None = None
    trace_context: str | None = None


#: Given how many times a compensation has failed, how long to wait before the next
#: try, or None to leave it to an operator.
RetryAfter = Callable[[int], timedelta | None]
#: A deadline no sweeper reaches: the saga waits for an operator.
NEVER = datetime(9999, 1, 1, tzinfo=UTC)
#: How long after moving on to its next stage a saga is looked at by the sweeper, unless
#: the caller says (``complete(deadline=...)``: the recovery policy's deadline).
STAGE_DEADLINE = timedelta(seconds=30)
#: Told, inside the transaction that gives a compensation up to an operator, of the
#: saga, how many times it failed and the last problem: what it writes commits with it.
Escalate = Callable[[Connection, UUID, int, str], None]
#: What the saga's handlers are told of a failed compensation, after the error's class:
#: stable texts a client may read. The error itself (SQL, a row's contents) stays in the
#: saga record, the log and the operator's dead letter.
COMPENSATION_RETRIED = "the compensation failed; it will be retried"
COMPENSATION_LEFT = "the compensation failed; an operator has been alerted"


class _DecideApart(Exception):
    """Deciding the stage in the step's transaction failed (not transiently): that
    transaction rolled back, step and all; the step runs again on its own."""


@dataclass(frozen=True)
class StepRun:
    """What running a step sent alone did: its outcome, and the stage's completion if
    the step was the stage's last and decided it in its own transaction."""

    outcome: StepOutcome
    #: The stage's completion, decided with the step; None when it was not the last
    #: step (or when the stage is still to be completed: ``decided`` False).
    completion: Completion | None = None
    #: Whether the stage needs no completion attempt after this step: it was decided
    #: with the step, or other steps of it have no outcome yet (one of them completes it).
    decided: bool = False


def run_step_and_complete(
    engine: Engine,
    saga: SagaHandlers,
    sagas: Sagas,
    saga_id: UUID,
    step: str,
    payload: Mapping[str, Any],
    *,
    attempt: int = 1,
    delay: float = 0.0,
    deadline: timedelta = STAGE_DEADLINE,
) -> StepRun:
    """Perform one step sent alone (not in a chord) once, and, when its outcome is the
    last its stage lacked, decide the stage in the same transaction.

    The step locks the saga row before its effect, as a completion does (so locks are
    taken in one order: the saga, then what the step or the compensations touch), and
    the steps of one saga take turns: the last to take the lock reads every other
    outcome in the ledger. One transaction then does what took three (the step, a first
    completion attempt that finds another step missing, the completion). A step that
    finds its outcome recorded (a redelivery) changes nothing and returns it, with
    ``decided`` False: the caller completes the stage in case a crash came between.

    Deciding with the step is an optimisation, never a change of outcome: when it fails
    (other than transiently) the transaction rolls back, and the step runs as
    ``run_step`` does, its completion left to the caller. ``sagas`` finds the handlers
    that decide the saga (by the row's name and version), as for ``complete``."""
    started_at = datetime.now(UTC)
    if delay:
        time.sleep(delay)  # test-only (Settings.step_delay_seconds)
    try:
        with transaction(engine) as conn:
            locked = store.lock_saga_first(conn, saga_id)
            if locked is None or step in locked.outcomes:
                raise _AlreadyRecorded  # or no such saga: as run_step finds it
            reason = saga.apply(step, conn, payload)
            status = StepStatus.APPLIED if reason is None else StepStatus.REFUSED
            outcome = StepOutcome(step, status, reason)
            now = datetime.now(UTC)
            recorded = store.record_step(
                conn, saga_id, outcome, started_at=started_at, now=now, attempts=attempt
            )
            if not recorded:
                raise _AlreadyRecorded
            failpoint("step.before_commit", step)
            decided = _decide_with_step(conn, sagas, locked, outcome, deadline)
    except _AlreadyRecorded:
        outcome = run_step(engine, saga, saga_id, step, payload, attempt=attempt)
        return StepRun(outcome)
    except _DecideApart:
        logger.warning("saga %s: deciding with step %s failed; the step runs alone", saga_id, step)
        outcome = run_step(engine, saga, saga_id, step, payload, attempt=attempt)
        return StepRun(outcome)
    failpoint("step.after_commit", step)
    if decided is None:
        return StepRun(outcome, decided=True)
    return StepRun(outcome, _decided(decided), decided=True)


def _decide_with_step(
    conn: Connection, sagas: Sagas, locked: LockedSaga, outcome: StepOutcome, deadline: timedelta
) -> _Decided | None:
    """In the step's transaction, under the saga's lock: decide the running stage if
    this step's outcome was the last it lacked; None if other steps have none yet."""
    outcomes = {**locked.outcomes, outcome.step: outcome}
    if locked.state is not SagaState.RUNNING:
        return None  # decided already (its missing steps recorded aborted) or under way
    locked = LockedSaga(
        locked.saga_id,
        locked.name,
        locked.state,
        locked.reason,
        locked.payload,
        outcomes,
        locked.redrives,
        locked.created_at,
        locked.recovery_attempts,
        locked.trace_context,
        version=locked.version,
        stage=locked.stage,
    )
    try:
        definition = handlers_for(sagas, locked).definition
        running = definition.stages[locked.stage].steps
        if any(step.name not in outcomes for step in running):
            return None
        return _decide_locked(conn, sagas, locked, None, running_only=True, deadline=deadline)
    except Exception as exc:
        # The decision takes rows (stock, credit) while the step holds the rows of its
        # own effect: two sagas of one customer deciding at once may each wait for the
        # other. PostgreSQL breaks that deadlock by failing one of them (after
        # deadlock_timeout): that step decides apart, as after any failed decision.
        if _deadlocked(exc) or not is_transient(exc):
            raise _DecideApart from exc
        raise


def _deadlocked(exc: BaseException) -> bool:
    """Whether PostgreSQL broke a deadlock by failing this transaction (40P01)."""
    return getattr(getattr(exc, "orig", None), "pgcode", None) == "40P01"


def complete(
    engine: Engine,
    saga: Sagas,
    saga_id: UUID,
    *,
    retry_after: RetryAfter,
    abort_missing: str | None = None,
    running_only: bool = False,
    escalate: Escalate | None = None,
    deadline: timedelta = STAGE_DEADLINE,
    expired: str | None = None,
) -> Completion:
    """Decide the saga's running stage: move on to the next stage, confirm the saga
    after its last, or compensate its applied steps and cancel it. Idempotent.

    ``saga``: the saga's handlers, or a lookup (``SagaRegistry``) that finds them by the
    row's name and version (UnknownSagaVersion if this process lacks them). Moving on
    sets the saga's stage, its deadline (``deadline`` from now) and an outbox entry in
    the decision's transaction; the caller dispatches the stage (``Completion
    .advanced_to``). ``expired`` (the business timeout passed) cancels with that reason
    instead of moving on.

    Steps of the running stage with no outcome raise StepsPending, unless
    ``abort_missing`` names the reason to record them as aborted with. Transient
    database errors propagate (retry later).
    A compensation that fails leaves the saga COMPENSATION_FAILED, to be tried again
    by the sweeper after ``retry_after(failures so far)``, or, when that is None, left
    to an operator (``Completion.escalated``, and ``escalate`` in that transaction);
    ``running_only`` leaves such a saga
    alone (a step's completion attempt does not retry a compensation early)."""
    try:
        return _complete_once(
            engine,
            saga,
            saga_id,
            abort_missing,
            running_only=running_only,
            deadline=deadline,
            expired=expired,
        )
    except _DecisionFailed as failed:
        failure = failed
    if failure.decision.state is SagaState.CONFIRMED:
        try:
            return _complete_once(
                engine, saga, saga_id, abort_missing, CONFIRMATION_FAILED, running_only
            )
        except _DecisionFailed as failed:
            failure = failed
    return _record_compensation_failure(engine, saga, saga_id, failure, retry_after, escalate)


#: Told, in the transaction that cancels a running saga on request and under its lock,
#: that it does: what it writes commits with the decision.
Within = Callable[[Connection], None]


def cancel(
    engine: Engine,
    saga: Sagas,
    saga_id: UUID,
    reason: str,
    *,
    retry_after: RetryAfter,
    within: Within | None = None,
    escalate: Escalate | None = None,
) -> Completion:
    """Cancel a running saga on request: the steps of its running stage without an
    outcome are recorded ABORTED with ``reason`` (a step committing meanwhile is waited
    for, and its outcome stands), its applied steps are compensated, latest stage
    first, and it ends CANCELLED with ``reason``.

    The saga's lock decides against its own completion: a saga decided first (or whose
    compensation failed earlier: its cancellation is under way) is left alone and
    ``Completion(None)`` returned. A compensation that fails leaves the saga
    COMPENSATION_FAILED with ``reason``, as in ``complete`` (``within`` then runs in
    that transaction)."""
    try:
        return _complete_once(
            engine, saga, saga_id, reason, reason, running_only=True, within=within
        )
    except _DecisionFailed as failed:
        return _record_compensation_failure(
            engine, saga, saga_id, failed, retry_after, escalate, within
        )


def _complete_once(
    engine: Engine,
    saga: Sagas,
    saga_id: UUID,
    abort_missing: str | None,
    cancel_reason: str | None = None,
    running_only: bool = False,
    within: Within | None = None,
    deadline: timedelta = STAGE_DEADLINE,
    expired: str | None = None,
) -> Completion:
    with transaction(engine) as conn:
        locked = store.lock_saga(conn, saga_id)
        if locked is None:
            raise LookupError(f"no saga {saga_id}")
        decided = _decide_locked(
            conn,
            saga,
            locked,
            abort_missing,
            cancel_reason,
            running_only,
            within,
            deadline,
            expired,
        )
    return _decided(decided)


@dataclass(frozen=True)
class _Decided:
    """What a stage's decision did in its transaction, to be reported once it commits."""

    completion: Completion
    saga_id: UUID
    name: str | None = None


def _decide_locked(
    conn: Connection,
    saga: Sagas,
    locked: LockedSaga,
    abort_missing: str | None,
    cancel_reason: str | None = None,
    running_only: bool = False,
    within: Within | None = None,
    deadline: timedelta = STAGE_DEADLINE,
    expired: str | None = None,
) -> _Decided:
    """Decide the locked saga's running stage and carry the decision out, in the
    caller's transaction (see ``complete``)."""
    saga_id = locked.saga_id
    if locked.state in TERMINAL_STATES or (running_only and locked.state is not SagaState.RUNNING):
        logger.info("saga %s is already %s", saga_id, locked.state)
        return _Decided(Completion(None), saga_id)
    if locked.state is SagaState.COMPENSATION_FAILED:
        cancel_reason = locked.reason  # finish the cancellation that was decided
    handlers = handlers_for(saga, locked)
    definition = handlers.definition
    if within is not None:
        within(conn)
    outcomes = _outcomes(conn, definition, locked, abort_missing)
    stage = locked.stage
    decision = decide(definition, outcomes, stage=stage, cancel_reason=cancel_reason)
    if decision.advances and expired is not None:
        decision = decide(definition, outcomes, stage=stage, cancel_reason=expired)
    if decision.advances:
        moved_on = _advance(conn, definition, locked, decision, deadline)
        failpoint("advance.before_commit", definition.name)
        return _Decided(moved_on, saga_id, definition.name)
    _decide_in(conn, handlers, locked, decision)
    failpoint("complete.before_commit", definition.name)
    return _Decided(Completion(decision, locked.created_at), saga_id, definition.name)


def _decided(decided: _Decided) -> Completion:
    """Report a stage's decision once its transaction has committed."""
    done, saga_id = decided.completion, decided.saga_id
    if done.decision is None:
        return done
    if done.advanced_to is not None:
        failpoint("advance.after_commit", decided.name)
        logger.info("saga %s moved on to stage %s", saga_id, done.advanced_to)
        return done
    failpoint("complete.after_commit", decided.name)
    logger.info("saga %s %s %s", saga_id, done.decision.state, done.decision.reason or "")
    return done


def _decide_in(
    conn: Connection, handlers: SagaHandlers, locked: LockedSaga, decision: Decision
) -> None:
    """Carry a final decision out; a failure that is not transient is _DecisionFailed."""
    try:
        _carry_out(conn, handlers, locked, decision)
    except Exception as exc:
        if is_transient(exc):
            raise
        logger.exception("saga %s: %s failed", locked.saga_id, decision.state)
        raise _DecisionFailed(decision) from exc


def _advance(
    conn: Connection,
    definition: SagaDefinition,
    locked: LockedSaga,
    decision: Decision,
    deadline: timedelta,
) -> Completion:
    """Move the saga on to its next stage, in the caller's transaction."""
    assert decision.next_stage is not None
    now = datetime.now(UTC)
    store.advance_saga(
        conn, locked.saga_id, decision.next_stage, now=now, deadline_at=now + deadline
    )
    return Completion(
        decision,
        locked.created_at,
        saga_id=locked.saga_id,
        advanced_to=decision.next_stage,
        definition=definition,
        payload=locked.payload,
        trace_context=locked.trace_context,
    )


def _outcomes(
    conn: Connection, definition: SagaDefinition, locked: LockedSaga, abort_missing: str | None
) -> Mapping[str, StepOutcome]:
    running = definition.stages[locked.stage].steps
    missing = [step.name for step in running if step.name not in locked.outcomes]
    if not missing:
        return locked.outcomes
    if abort_missing is None:
        raise StepsPending(f"saga {locked.saga_id}: no outcome yet for {missing}")
    now = datetime.now(UTC)
    for step in missing:
        # Waits for a step committing right now; its outcome then stands.
        aborted = StepOutcome(step, StepStatus.ABORTED, abort_missing)
        store.record_step(conn, locked.saga_id, aborted, started_at=now, now=now)
    return store.read_ledger(conn, locked.saga_id)


def _carry_out(
    conn: Connection, saga: SagaHandlers, locked: LockedSaga, decision: Decision
) -> None:
    now = datetime.now(UTC)
    if decision.state is SagaState.CONFIRMED:
        saga.confirm(conn, locked.payload)
    else:
        for step in decision.compensate:
            failpoint("compensate.release")
            saga.compensate(step, conn, locked.payload)
        store.mark_compensated(conn, locked.saga_id, decision.compensate, now)
        saga.cancel(conn, locked.payload, decision.reason or "cancelled")
    store.finish_saga(conn, locked.saga_id, decision.state, decision.reason, now)


def _record_compensation_failure(
    engine: Engine,
    saga: Sagas,
    saga_id: UUID,
    failure: _DecisionFailed,
    retry_after: RetryAfter,
    escalate: Escalate | None,
    within: Within | None = None,
) -> Completion:
    reason = failure.decision.reason or "cancelled"
    kind = type(failure.__cause__).__name__
    problem = f"{kind}: {failure.__cause__}"[:2000]
    with engine.begin() as conn:
        locked = store.lock_saga(conn, saga_id)
        if locked is None or locked.state in TERMINAL_STATES:
            return Completion(None)
        if within is not None:
            if locked.state is not SagaState.RUNNING:
                return Completion(None)  # decided meanwhile by another
            within(conn)
        failed_before = 0 if locked.state is SagaState.RUNNING else locked.recovery_attempts
        attempts = failed_before + 1
        wait = retry_after(attempts)
        retry_at = NEVER if wait is None else datetime.now(UTC) + wait
        store.mark_compensation_failed(conn, saga_id, reason, problem, retry_at, attempts)
        summary = f"{kind}: {COMPENSATION_LEFT if wait is None else COMPENSATION_RETRIED}"
        handlers_for(saga, locked).compensation_failed(conn, locked.payload, reason, summary)
        if wait is None and escalate is not None:
            escalate(conn, saga_id, attempts, problem)
    if wait is None:
        logger.error(
            "saga %s: compensation failed %d times; left to an operator: %s",
            saga_id,
            attempts,
            problem,
        )
    else:
        logger.error(
            "saga %s: compensation failed (%d), retry at %s: %s",
            saga_id,
            attempts,
            retry_at,
            problem,
        )
    decision = Decision(SagaState.COMPENSATION_FAILED, failure.decision.compensate, reason)
    return Completion(decision, locked.created_at, attempts, wait is None, saga_id)


class RunningSagaCanceller:
    """The API's ``SagaCanceller``: cancels a running saga in the request (see
    ``runner.cancel``; ``saga``: its handlers, or a registry that finds them by the
    saga's name and version); a compensation that fails is left to the sweeper, as any."""

    def __init__(
        self,
        engine: Engine,
        saga: Sagas,
        retry_after: RetryAfter,
        escalate: Escalate | None = None,
    ) -> None:
        self.engine = engine
        self.saga = saga
        self.retry_after = retry_after
        self.escalate = escalate

    def cancel(self, saga_id: UUID, reason: str, within: Callable[[Connection], None]) -> bool:
        """Cancel the saga if it is running; False if it was decided first."""
        done = cancel(
            self.engine,
            self.saga,
            saga_id,
            reason,
            retry_after=self.retry_after,
            within=within,
            escalate=self.escalate,
        )
        return done.decision is not None
