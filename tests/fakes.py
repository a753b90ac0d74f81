"""Fakes of our own ports, for tests that must not reach the broker."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Connection

from orders.saga import ORDER_SAGA
from sagas.definition import SagaDefinition, SagaStart
from sagas.launch import stage_saga


class RecordingLauncher:
    """Stages sagas for real (same transaction as the order) but only records launches."""

    def __init__(self, definition: SagaDefinition = ORDER_SAGA) -> None:
        self.definition = definition
        self.launched: list[SagaStart] = []

    def stage(self, conn: Connection, start: SagaStart) -> None:
        """Record the saga and its outbox entry, as the real launcher does."""
        stage_saga(conn, self.definition, start, deadline=timedelta(seconds=30))

    def launch(self, start: SagaStart) -> bool:
        """Remember the start instead of publishing it."""
        self.launched.append(start)
        return True
