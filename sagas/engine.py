"""Step outcomes, saga states, and ``decide``: confirm, or compensate what was applied. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sagas.definition import SagaDefinition


class StepStatus(StrEnum):
    """What the ledger says of one step of one saga."""

    #: The step's effect is in place.
    APPLIED = "APPLIED"
    #: The step ran and refused (a business outcome, e.g. out of stock); no effect.
    REFUSED = "REFUSED"
    #: The saga was decided before the step ran; if it runs late it does nothing.
    ABORTED = "ABORTED"
    #: The step's effect was applied, then undone.
    COMPENSATED = "COMPENSATED"


class SagaState(StrEnum):
    """Where a saga stands. RUNNING ends CONFIRMED or CANCELLED. A saga whose
    compensation failed waits in COMPENSATION_FAILED, retried, until it is CANCELLED."""

    RUNNING = "RUNNING"
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


TERMINAL_STATES = frozenset({SagaState.CONFIRMED, SagaState.CANCELLED})
#: States the sweeper watches.
ACTIVE_STATES = frozenset({SagaState.RUNNING, SagaState.COMPENSATION_FAILED})

#: A step that had not run when the saga reached its business timeout
#: (``SAGA_TIMEOUT_SECONDS``): the one refusal that is about time, not stock or credit.
TIMED_OUT = "timed_out"
#: A step whose task failed for good (retries exhausted, or an unexpected error).
STEP_FAILED = "step_failed"
#: Every step applied, but making the effects final failed; the saga cancels instead.
CONFIRMATION_FAILED = "confirmation_failed"


@dataclass(frozen=True)
class StepOutcome:
    """A step's recorded outcome, as its task returns it to the chord."""

    step: str
    status: StepStatus
    reason: str | None = None

    def to_message(self) -> dict[str, Any]:
        """The outcome as JSON-ready primitives."""
        return {"step": self.step, "status": self.status.value, "reason": self.reason}


@dataclass(frozen=True)
class Decision:
    """What completing the running stage decided: the saga's final state, the steps to
    compensate, and why; or, with ``next_stage``, that it goes on (state RUNNING)."""

    state: SagaState
    compensate: tuple[str, ...] = ()
    reason: str | None = None
    #: The stage the saga goes on to (every step of the running one applied).
    next_stage: int | None = None

    @property
    def advances(self) -> bool:
        """Whether the saga goes on to its next stage (it is not decided yet)."""
        return self.next_stage is not None


def advance(stage: int) -> Decision:
    """The decision to go on from ``stage`` to the next."""
    return Decision(SagaState.RUNNING, next_stage=stage + 1)


def reversed_by_stage(definition: SagaDefinition, stage: int) -> list[str]:
    """The steps of stages ``stage`` down to 0, the latest stage first and each stage's
    steps in reverse declaration order: the order compensations run in."""
    return [
        step.name
        for done in reversed(definition.stages[: stage + 1])
        for step in reversed(done.steps)
    ]


def decide(
    definition: SagaDefinition,
    outcomes: Mapping[str, StepOutcome],
    *,
    stage: int = 0,
    cancel_reason: str | None = None,
) -> Decision:
    """Decide the running ``stage`` once each of its steps has an outcome: when all of
    them applied, go on to the next stage, or confirm after the last; otherwise cancel
    with the reason of the first step (in declaration order) that did not apply, and
    compensate every applied step of this stage and the earlier ones, the latest stage
    first (within a stage, in reverse declaration order). Later stages never run.

    With ``cancel_reason``, cancel whatever the outcomes (compensating every applied
    step, in the same order): the saga could not be confirmed, or its earlier
    cancellation must finish."""
    if not 0 <= stage < len(definition.stages):
        raise ValueError(f"saga {definition.name!r} has no stage {stage}")
    running = [step.name for step in definition.stages[stage].steps]
    missing = [name for name in running if name not in outcomes]
    if missing:
        raise ValueError(f"no outcome for steps {missing} of saga {definition.name!r}")
    reached = [step.name for done in definition.stages[: stage + 1] for step in done.steps]
    statuses = {name: outcomes[name].status for name in reached if name in outcomes}
    if any(status is StepStatus.COMPENSATED for status in statuses.values()):
        raise ValueError("a saga with compensated steps was already decided")
    applied = tuple(
        name
        for name in reversed_by_stage(definition, stage)
        if statuses.get(name) is StepStatus.APPLIED
    )
    if cancel_reason is not None:
        return Decision(SagaState.CANCELLED, compensate=applied, reason=cancel_reason)
    refused = [name for name in running if statuses[name] is not StepStatus.APPLIED]
    if not refused:
        if stage + 1 < len(definition.stages):
            return advance(stage)
        return Decision(SagaState.CONFIRMED)
    return Decision(SagaState.CANCELLED, compensate=applied, reason=outcomes[refused[0]].reason)
