"""The deadline sweeper: no saga stays unfinished, and no saga is refused for waiting.

A saga still active past its deadline has either lost something on the way (a message:
a worker killed, Redis restarted without its data; the chord's join; its completion)
or is only late (saga workers stopped for a deploy, or behind a backlog). The sweeper
tells the two apart by whether saga workers consume the saga lane and have caught up
with it (``lane_ready``: then an overdue saga's message is no longer queued):

Each saga is looked at in its running stage (``sagas.stage``), on the definition of its
name and version (a saga whose version this process lacks is left to one that has it):

- every step of the stage has an outcome: the join or the completion was lost; complete
  the stage now (which may move the saga on: the next stage is dispatched at once);
- steps missing, lane ready: the steps' messages are lost; dispatch the stage again
  (idempotent: a step that already ran returns its recorded outcome), and look again
  after a wait that doubles with each redrive, up to a cap;
- steps missing, lane not ready (no worker, or a backlog): the saga is waiting, not
  lost; look again soon, so that it is redriven within seconds of the lane being ready;
- the business timeout passed (``timeout`` after acceptance): cancel it, recording the
  stage's missing steps as ``timed_out`` (a saga whose stage is complete then is not
  moved on: it is cancelled ``timed_out``, unless the stage was its last). Nothing else
  gives up on an order for lack of time;
- ``COMPENSATION_FAILED``: try the compensation again (its own backoff, see
  ``runner.complete``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from uuid import UUID

from celery import Celery
from sqlalchemy import Engine

from config import tracing
from sagas import runner, store
from sagas.canvas import dispatch_saga
from sagas.definition import UnknownSagaVersion
from sagas.engine import TIMED_OUT, SagaState
from sagas.launch import clear_entries, dispatch_next_stage
from sagas.runner import Completion, SagaLookup

logger = logging.getLogger(__name__)

#: Most overdue sagas one sweep takes up.
SWEEP_BATCH = 100


@dataclass(frozen=True)
class RecoveryPolicy:
    """How patient the sweeper is."""

    #: How long after its dispatch a saga is looked at.
    deadline: timedelta
    #: The business timeout, from acceptance: past it the saga is cancelled.
    timeout: timedelta
    #: Waits after a redrive double from ``deadline`` up to this.
    redrive_max: timedelta
    #: A waiting saga (no worker consuming) is looked at again this soon.
    recheck: timedelta
    #: A failed compensation's first wait; later ones double...
    compensation_retry: timedelta
    #: ... up to this.
    compensation_retry_max: timedelta
    #: Failed compensation tries before the saga is left to an operator.
    compensation_max_attempts: int

    def redrive_wait(self, redrives: int) -> timedelta:
        """How long to wait after the ``redrives``-th redrive (1, 2, ...)."""
        return min(self.redrive_max, self.deadline * (1 << min(redrives, 32)))

    def compensation_wait(self, attempts: int) -> timedelta | None:
        """How long to wait after ``attempts`` failed compensations (1, 2, ...); None
        once they reach ``compensation_max_attempts``: an operator takes it from there."""
        if attempts >= self.compensation_max_attempts:
            return None
        doubled = self.compensation_retry * (1 << min(attempts - 1, 32))
        return min(self.compensation_retry_max, doubled)


@dataclass
class SweepReport:
    """What one sweep did."""

    redriven: int = 0
    completed: int = 0
    waiting: int = 0
    failed: int = 0


def sweep_overdue(
    engine: Engine,
    app: Celery,
    sagas: SagaLookup,
    policy: RecoveryPolicy,
    *,
    lane_ready: Callable[[], bool] = lambda: True,
    limit: int = SWEEP_BATCH,
    on_complete: Callable[[Completion], None] | None = None,
    escalate: runner.Escalate | None = None,
) -> SweepReport:
    """Take up every saga past its deadline; return what was done. ``sagas``: the
    handlers by name and version (a ``SagaRegistry``). ``lane_ready`` says
    whether saga workers consume the lane and have caught up (asked once per sweep);
    ``on_complete`` is told of every saga the sweep decided; ``escalate``, of a
    compensation given up to an operator (see ``runner.complete``)."""
    now = datetime.now(UTC)
    with engine.connect() as conn:
        overdue = store.overdue_sagas(conn, now, limit)
    report = SweepReport()
    if not overdue:
        return report
    ready = lane_ready()
    for saga_id in overdue:
        try:
            action = recover(engine, app, sagas, saga_id, policy, now, ready, on_complete, escalate)
        except Exception:
            logger.exception("saga %s: recovery failed; tried again soon", saga_id)
            report.failed += 1
            continue
        if action in ("redriven", "completed", "waiting"):
            setattr(report, action, getattr(report, action) + 1)
    if report.redriven or report.completed or report.failed:
        logger.info("sweep: %s", report)
    return report


def recover(
    engine: Engine,
    app: Celery,
    sagas: SagaLookup,
    saga_id: UUID,
    policy: RecoveryPolicy,
    now: datetime,
    ready: bool = True,
    on_complete: Callable[[Completion], None] | None = None,
    escalate: runner.Escalate | None = None,
) -> str:
    """Complete, redrive or leave waiting one overdue saga; "skipped" if it is no longer
    overdue (finished, or another sweeper took it), or if this process does not have
    its version. A stage completed here that moves the saga on is dispatched at once."""
    with engine.begin() as conn:
        # Committed first, with a short deadline: a crash while recovering still counts,
        # and the saga is looked at again soon. What is done next sets the real one.
        claimed = store.claim_overdue(conn, saga_id, now, now + policy.recheck)
    if claimed is None:
        return "skipped"
    try:
        saga = sagas.get(claimed.name, claimed.version)
    except UnknownSagaVersion as exc:
        logger.warning("saga %s overdue, left to a sweeper that has it: %s", saga_id, exc)
        return "skipped"
    stage = saga.definition.stages[claimed.stage]
    missing = [step.name for step in stage.steps if step.name not in claimed.outcomes]
    expires_at = (claimed.created_at or now) + policy.timeout
    if claimed.state is SagaState.RUNNING and missing and now < expires_at:
        if not ready:
            return "waiting"
        with tracing.resumed(claimed.trace_context, "sweeper redrive", saga_id=saga_id):
            dispatch_saga(app, saga.definition, saga_id, claimed.payload, stage=claimed.stage)
        redrives = claimed.redrives + 1
        next_look = min(now + policy.redrive_wait(redrives), expires_at)
        with engine.begin() as conn:
            store.count_redrive(conn, saga_id, next_look)
        logger.warning(
            "saga %s overdue, steps %s of stage %d missing: dispatched again (redrive %d)",
            saga_id,
            missing,
            claimed.stage,
            redrives,
        )
        return "redriven"
    with tracing.resumed(claimed.trace_context, "sweeper completion", saga_id=saga_id):
        done = runner.complete(
            engine,
            saga,
            saga_id,
            retry_after=policy.compensation_wait,
            abort_missing=TIMED_OUT,
            escalate=escalate,
            deadline=policy.deadline,
            expired=TIMED_OUT if now >= expires_at else None,
        )
        dispatch_next_stage(app, done, partial(_clear, engine))
    if on_complete is not None:
        on_complete(done)
    return "completed"


def _clear(engine: Engine, saga_id: UUID, stage: int) -> None:
    with engine.begin() as conn:
        clear_entries(conn, [(saga_id, stage)])
