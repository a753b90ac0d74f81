"""The ports through which the order domain reaches what lies beyond it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import Connection


@dataclass(frozen=True)
class SagaStart:
    """The request to run an accepted order's saga. The payload holds primitives only."""

    saga_id: UUID
    order_id: UUID
    payload: Mapping[str, Any]


class SagaStarter(Protocol):
    """Starts the saga of an accepted order: recorded with the order, dispatched after."""

    def stage(self, conn: Connection, start: SagaStart) -> None:
        """Record the saga and its outbox entry in the caller's open transaction."""

    def launch(self, start: SagaStart) -> bool:
        """Dispatch a committed saga now; False if it was left to the outbox relay."""


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


class TimelineSource(Protocol):
    """Reads an order's saga timeline."""

    def timeline(self, order_id: UUID) -> SagaTimeline | None:
        """The timeline, or None if there is no such order."""
