"""The API's ``Operations`` port: the dead-letter queue, batch runs and their findings."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import Engine

from config.settings import Settings
from orders.errors import OperationRefusedError, OperationTargetNotFoundError
from sagas.registry import SagaRegistry
from workers import batch, dlq


class Operations:
    """Dead letters and batch runs, for the admin endpoints."""

    def __init__(
        self,
        engine: Engine,
        app: Celery,
        settings: Settings,
        definitions: SagaRegistry,
    ) -> None:
        self.engine = engine
        self.app = app
        self.settings = settings
        #: The sagas by name and version: replaying a step's letter dispatches its
        #: saga's running stage on the saga's own version.
        self.definitions = definitions

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
