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
    """The end of a saga: its final state, the steps to compensate, and why."""

    state: SagaState
    compensate: tuple[str, ...] = ()
    reason: str | None = None


def decide(
    definition: SagaDefinition,
    outcomes: Mapping[str, StepOutcome],
    *,
    cancel_reason: str | None = None,
) -> Decision:
    """Confirm when every step applied; otherwise compensate the applied ones and cancel
    with the reason of the first step (in declaration order) that did not apply.

    With ``cancel_reason``, cancel whatever the outcomes (compensating every applied
    step): the saga could not be confirmed, or its earlier cancellation must finish."""
    missing = [name for name in definition.step_names if name not in outcomes]
    if missing:
        raise ValueError(f"no outcome for steps {missing} of saga {definition.name!r}")
    statuses = {name: outcomes[name].status for name in definition.step_names}
    if any(status is StepStatus.COMPENSATED for status in statuses.values()):
        raise ValueError("a saga with compensated steps was already decided")
    applied = tuple(name for name, status in statuses.items() if status is StepStatus.APPLIED)
    if cancel_reason is not None:
        return Decision(SagaState.CANCELLED, compensate=applied, reason=cancel_reason)
    if len(applied) == len(statuses):
        return Decision(SagaState.CONFIRMED)
    reason = next(
        outcomes[name].reason
        for name, status in statuses.items()
        if status is not StepStatus.APPLIED
    )
    return Decision(SagaState.CANCELLED, compensate=applied, reason=reason)
