"""The API's ``Operations`` port: the dead-letter queue, batch runs and their findings,
and the saga tools (``sagas.operations``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import Engine

from config.settings import Settings
from orders.errors import OperationRefusedError, OperationTargetNotFoundError
from sagas import operations as saga_ops
from sagas.engine import SagaState
from sagas.registry import SagaRegistry
from workers import batch, dlq
from workers.sagas import run_action, saga_tools


class Operations:
    """Dead letters, batch runs and sagas, for the admin endpoints."""

    def __init__(
        self,
        engine: Engine,
        app: Celery,
        settings: Settings,
        definitions: SagaRegistry,
        sagas: SagaRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.app = app
        self.settings = settings
        #: The sagas by name and version: replaying a step's letter dispatches its
        #: saga's running stage on the saga's own version.
        self.definitions = definitions
        #: The saga tools, on ``sagas`` (by default ``definitions``: the API's registry,
        #: whose handlers write its credit cache through).
        self.saga_tools = saga_tools(engine, app, settings, sagas or definitions)

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
        older = timedelta(seconds=older_than_seconds) if older_than_seconds else None
        which = dlq.Filter(task, error, older, state, limit)
        return [letter.summary() for letter in dlq.list_letters(self.engine, which)]

    def dead_letter(self, letter_id: int) -> dict[str, Any] | None:
        """One letter in full, or None."""
        try:
            return dlq.show(self.engine, letter_id).detail()
        except dlq.DeadLetterError:
            return None

    def replay(self, letter_ids: list[int]) -> dict[int, str]:
        """Run letters again."""
        try:
            return dlq.replay(self.engine, self.app, letter_ids, self.definitions)
        except dlq.UnknownLetterError as exc:
            raise OperationTargetNotFoundError(str(exc)) from exc
        except dlq.DeadLetterError as exc:
            raise OperationRefusedError(str(exc)) from exc

    def purge(self, letter_ids: list[int]) -> int:
        """Mark letters purged."""
        return dlq.purge(self.engine, letter_ids)

    def start_credit_check(self) -> str:
        """Start a credit check run now."""
        run_id = batch.start_run(
            self.engine, self.app, self.settings, window=batch.on_demand_window()
        )
        return str(run_id)

    def batch_run(self, run_id: UUID) -> dict[str, Any] | None:
        """A run's progress."""
        status = batch.run_status(self.engine, run_id)
        return status.to_dict() if status else None

    def credit_reviews(
        self, *, flagged_only: bool, limit: int, after: str | None
    ) -> list[dict[str, Any]]:
        """The credit check's latest reviews (its findings: the flagged ones)."""
        return batch.credit_findings(
            self.engine, flagged_only=flagged_only, limit=limit, after=after
        )

    def sagas(
        self,
        *,
        states: list[str],
        name: str | None,
        older_than_seconds: float | None,
        limit: int,
        after: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of sagas, stuck first, and the cursor of the next page (ValueError: a
        cursor this list did not write)."""
        query = saga_ops.SagaQuery(
            tuple(SagaState(state) for state in states),
            name,
            timedelta(seconds=older_than_seconds) if older_than_seconds is not None else None,
            limit,
            after,
        )
        try:
            page = self.saga_tools.list(query)
        except saga_ops.BadCursorError as exc:
            raise ValueError(str(exc)) from exc
        return [row.to_dict() for row in page.sagas], page.next

    def saga(self, saga_id: UUID) -> dict[str, Any] | None:
        """One saga in full, or None."""
        try:
            return self.saga_tools.show(saga_id).to_dict()
        except saga_ops.SagaNotFoundError:
            return None

    def saga_action(self, saga_id: UUID, action: str) -> dict[str, Any]:
        """Retry a saga's missing steps ("retry"), cancel it ("cancel"), or run its
        failed compensation now ("retry-compensation")."""
        try:
            return run_action(self.saga_tools, action, saga_id).to_dict()
        except saga_ops.SagaNotFoundError as exc:
            raise OperationTargetNotFoundError(str(exc)) from exc
        except saga_ops.SagaActionRefusedError as exc:
            raise OperationRefusedError(str(exc)) from exc
