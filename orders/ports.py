"""The ports through which the order domain reaches what lies beyond it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
