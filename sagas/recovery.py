"""The deadline sweeper: no saga stays unfinished.

A saga still active past its deadline lost something on the way: a message (a worker
killed, Redis restarted without its data), the chord's join, or its completion. The
sweeper takes it up from PostgreSQL alone: if steps never ran it dispatches the chord
again (once, by default), giving it another deadline; after that, or when every step
has an outcome, it completes the saga itself, recording the missing steps as aborted,
so the saga is confirmed or compensated. A saga whose compensation failed is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from celery import Celery
from sqlalchemy import Engine

from sagas import runner, store
from sagas.canvas import dispatch_saga
from sagas.engine import DEADLINE_EXCEEDED, SagaState
from sagas.runner import Completion, SagaHandlers

logger = logging.getLogger(__name__)

#: Most overdue sagas one sweep takes up.
SWEEP_BATCH = 100


@dataclass(frozen=True)
class RecoveryPolicy:
    """How patient the sweeper is."""

    #: A saga gets this long again after each redrive.
    deadline: timedelta
    #: How many times a saga's chord is dispatched again before missing steps are aborted.
    max_redrives: int
    #: How long a failed compensation waits before the next try.
    compensation_retry: timedelta


@dataclass
class SweepReport:
    """What one sweep did."""

    redriven: int = 0
    completed: int = 0
    failed: int = 0


def sweep_overdue(
    engine: Engine,
    app: Celery,
    sagas: Mapping[str, SagaHandlers],
    policy: RecoveryPolicy,
    *,
    limit: int = SWEEP_BATCH,
    on_complete: Callable[[Completion], None] | None = None,
) -> SweepReport:
    """Take up every saga past its deadline; return what was done. ``on_complete`` is
    told of every saga the sweep decided."""
    now = datetime.now(UTC)
    with engine.connect() as conn:
        overdue = store.overdue_sagas(conn, now, limit)
    report = SweepReport()
    for saga_id in overdue:
        try:
            action = recover(engine, app, sagas, saga_id, policy, now, on_complete)
        except Exception:
            logger.exception("saga %s: recovery failed; tried again after its deadline", saga_id)
            report.failed += 1
            continue
        if action == "redriven":
            report.redriven += 1
        elif action == "completed":
            report.completed += 1
    if overdue:
        logger.info("sweep: %s", report)
    return report


def recover(
    engine: Engine,
    app: Celery,
    sagas: Mapping[str, SagaHandlers],
    saga_id: UUID,
    policy: RecoveryPolicy,
    now: datetime,
    on_complete: Callable[[Completion], None] | None = None,
) -> str:
    """Redrive or complete one overdue saga; "skipped" if it is no longer overdue."""
    with engine.begin() as conn:
        # Committed first: a crash while recovering still counts, and the saga waits
        # for its new deadline instead of being taken up again at once.
        # A compensation that fails again sets its own retry time (runner.complete).
        claimed = store.claim_overdue(conn, saga_id, now, now + policy.deadline)
    if claimed is None:
        return "skipped"
    saga = sagas[claimed.name]
    missing = [s for s in saga.definition.step_names if s not in claimed.outcomes]
    if claimed.state is SagaState.RUNNING and missing and claimed.redrives < policy.max_redrives:
        dispatch_saga(app, saga.definition, saga_id, claimed.payload)
        with engine.begin() as conn:
            store.count_redrive(conn, saga_id)
        logger.warning("saga %s overdue, steps %s missing: dispatched again", saga_id, missing)
        return "redriven"
    done = runner.complete(
        engine,
        saga,
        saga_id,
        retry_after=policy.compensation_retry,
        abort_missing=DEADLINE_EXCEEDED,
    )
    if on_complete is not None:
        on_complete(done)
    return "completed"
