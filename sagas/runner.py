"""Running a saga's steps and its completion, each exactly once in effect.

A step's effect and its ledger row commit in one transaction; a redelivered step finds
its row, rolls its repeated effect back and returns the recorded outcome, so the chord
sees the identical result. Completion locks the saga row, decides from the ledger, and
confirms or compensates in one transaction; a second completion finds the saga finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import Connection, Engine

from sagas import store
from sagas.definition import SagaDefinition
from sagas.engine import (
    TERMINAL_STATES,
    Decision,
    SagaState,
    StepOutcome,
    StepStatus,
    decide,
)

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


class _AlreadyRecorded(Exception):
    """The ledger already holds this step's outcome: roll the repeated effect back."""


def run_step(
    engine: Engine,
    saga: SagaHandlers,
    saga_id: UUID,
    step: str,
    payload: Mapping[str, Any],
    *,
    delay: float = 0.0,
) -> StepOutcome:
    """Perform one step once; on any later delivery, return the recorded outcome."""
    started_at = datetime.now(UTC)
    if delay:
        time.sleep(delay)  # test-only (Settings.step_delay_seconds)
    try:
        with engine.begin() as conn:
            reason = saga.apply(step, conn, payload)
            status = StepStatus.APPLIED if reason is None else StepStatus.REFUSED
            outcome = StepOutcome(step, status, reason)
            now = datetime.now(UTC)
            if not store.record_step(conn, saga_id, outcome, started_at=started_at, now=now):
                raise _AlreadyRecorded
    except _AlreadyRecorded:
        with engine.connect() as conn:
            outcome = store.read_step(conn, saga_id, step)
        logger.info("saga %s step %s was already recorded: %s", saga_id, step, outcome.status)
    return outcome


@dataclass(frozen=True)
class Completion:
    """What completing a saga did: its decision, or nothing if it was already finished."""

    decision: Decision | None


def complete(engine: Engine, saga: SagaHandlers, saga_id: UUID) -> Completion:
    """Confirm the saga, or compensate its applied steps and cancel it. Idempotent."""
    with engine.begin() as conn:
        locked = store.lock_saga(conn, saga_id)
        if locked is None:
            raise LookupError(f"no saga {saga_id}")
        if locked.state in TERMINAL_STATES:
            logger.info("saga %s is already %s", saga_id, locked.state)
            return Completion(None)
        decision = decide(saga.definition, locked.outcomes)
        now = datetime.now(UTC)
        if decision.state is SagaState.CONFIRMED:
            saga.confirm(conn, locked.payload)
        else:
            for step in decision.compensate:
                saga.compensate(step, conn, locked.payload)
            store.mark_compensated(conn, saga_id, decision.compensate, now)
            saga.cancel(conn, locked.payload, decision.reason or "cancelled")
        store.finish_saga(conn, saga_id, decision.state, decision.reason, now)
    logger.info("saga %s %s %s", saga_id, decision.state, decision.reason or "")
    return Completion(decision)
