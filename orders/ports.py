"""The ports through which the order domain reaches what lies beyond it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import Connection

from sagas.definition import SagaStart


class SagaStarter(Protocol):
    """Starts the saga of an accepted order: recorded with the order, dispatched after."""

    def stage(self, conn: Connection, start: SagaStart) -> None:
        """Record the saga and its outbox entry in the caller's open transaction."""

    def launch(self, start: SagaStart) -> bool:
        """Dispatch a committed saga now; False if it was left to the outbox relay."""


class SagaCanceller(Protocol):
    """Cancels a running saga on request (a customer's cancel)."""

    def cancel(self, saga_id: UUID, reason: str, within: Callable[[Connection], None]) -> bool:
        """Cancel the saga if it is still running: its steps without an outcome never take
        effect, its applied ones are compensated, and its ``cancel`` records ``reason``;
        ``within`` runs in the transaction that decides, under the saga's lock. False
        when the saga was decided first (or is being compensated already)."""


@dataclass(frozen=True)
class TimelineStep:
    """One saga step as it ran."""

    name: str
    started_at: datetime
    finished_at: datetime
    #: APPLIED, REFUSED, ABORTED or COMPENSATED.
    outcome: str
    reason: str | None
    attempts: int


@dataclass(frozen=True)
class SagaTimeline:
    """An order's saga on a time axis: accepted, each step, decided."""

    order_id: UUID
    saga_id: UUID
    state: str
    reason: str | None
    accepted_at: datetime
    finished_at: datetime | None
    steps: tuple[TimelineStep, ...]
    #: The OpenTelemetry trace of the order (config.tracing); None with traces off.
    trace_id: str | None = None
    #: The order's refund saga, when one was started (its order_id is the order's).
    refund: SagaTimeline | None = None


class TimelineSource(Protocol):
    """Reads an order's saga timeline."""

    def timeline(self, order_id: UUID) -> SagaTimeline | None:
        """The timeline, or None if there is no such order."""


class Operations(Protocol):
    """What operators may do through the API: the dead-letter queue, batch runs, sagas.
    Results are JSON-ready; a refused operation raises OperationRefusedError."""

    def dead_letters(
        self,
        *,
        task: str | None,
        error: str | None,
        older_than_seconds: float | None,
        state: str,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Letters matching the filter, most recent first."""

    def dead_letter(self, letter_id: int) -> dict[str, Any] | None:
        """One letter in full, or None."""

    def replay(self, letter_ids: list[int]) -> dict[int, str]:
        """Run letters again; each letter's new task id."""

    def purge(self, letter_ids: list[int]) -> int:
        """Mark letters purged; how many were."""

    def start_credit_check(self) -> str:
        """Start a credit check run now; its id."""

    def batch_run(self, run_id: UUID) -> dict[str, Any] | None:
        """A batch run's progress, or None."""

    def credit_reviews(
        self, *, flagged_only: bool, limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        """Customers' latest credit reviews by customer id (after ``after``), at most
        ``limit``; only the flagged ones when ``flagged_only``."""

    def sagas(
        self,
        *,
        states: list[str],
        name: str | None,
        older_than_seconds: float | None,
        limit: int,
        after: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Sagas in these states (of this definition, accepted at least this long ago),
        stuck ones first, at most ``limit``, after the cursor ``after``; and the next
        page's cursor, if any. A cursor this list did not write raises ValueError."""

    def saga(self, saga_id: UUID) -> dict[str, Any] | None:
        """One saga with its ledger and timeline, or None."""

    def saga_action(self, saga_id: UUID, action: str) -> dict[str, Any]:
        """Carry out "retry", "cancel" or "retry-compensation" on the saga: what it did.
        OperationTargetNotFoundError: no such saga; OperationRefusedError: its state
        does not allow it (the message says why)."""
