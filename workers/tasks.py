"""The tasks: thin wrappers that parse primitives and call one function of ``sagas``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

from celery import Celery

from config import names
from sagas import runner
from sagas.launch import relay_outbox
from sagas.order import DEFINITIONS, ORDER_SAGA
from workers.base import SagaTask
from workers.runtime import Runtime


def register_tasks(app: Celery, runtime: Runtime) -> None:
    """Register every task of the system on ``app``, by the names in ``config.names``."""
    for step in ORDER_SAGA.steps:
        app.task(name=step.task, base=SagaTask)(_step_task(runtime, step.name))

    @app.task(name=names.COMPLETE_ORDER, base=SagaTask)
    def complete_order(results: list[dict[str, Any]], saga_id: str) -> None:
        """Chord body: confirm the order, or compensate and cancel it (from the ledger)."""
        runner.complete(runtime.engine, runtime.order_saga, UUID(saga_id))

    @app.task(name=names.RELAY_OUTBOX, base=SagaTask)
    def relay() -> int:
        """Dispatch the sagas whose fast-path dispatch did not happen."""
        grace = timedelta(seconds=runtime.settings.outbox_grace_seconds)
        return relay_outbox(runtime.engine, app, DEFINITIONS, grace=grace)


def _step_task(runtime: Runtime, step: str) -> Callable[[str, dict[str, Any]], dict[str, Any]]:
    def run_step(saga_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        outcome = runner.run_step(
            runtime.engine,
            runtime.order_saga,
            UUID(saga_id),
            step,
            payload,
            delay=runtime.settings.step_delay_seconds,
        )
        return outcome.to_message()

    run_step.__name__ = run_step.__qualname__ = step
    run_step.__doc__ = f"Chord header: the saga step {step!r}, once per saga."
    return run_step
