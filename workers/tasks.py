"""The tasks: thin wrappers that parse primitives and call one function of ``sagas``.

A saga step never fails its chord when it can help it: an error that outlived its
retries, or an unexpected one, is recorded as the step's outcome (ABORTED), so the
chord's completion still runs and compensates. Only when even that cannot be written
(the database is down) does the step fail; the deadline sweeper then finishes the saga.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

from celery import Celery, Task

from config import names
from sagas import runner
from sagas.engine import STEP_FAILED
from sagas.launch import relay_outbox
from sagas.order import DEFINITIONS, ORDER_SAGA
from sagas.recovery import sweep_overdue
from workers.base import TRANSIENT_ERRORS, HousekeepingTask, SagaTask, retry_delay
from workers.metrics import STEP_DURATION, record_completion
from workers.runtime import Runtime

logger = logging.getLogger(__name__)

#: The reason recorded for a step whose message kept crashing its worker.
POISON_MESSAGE = "poison_message"


def register_tasks(app: Celery, runtime: Runtime) -> None:
    """Register every task of the system on ``app``, by the names in ``config.names``."""
    for step in ORDER_SAGA.steps:
        app.task(name=step.task, base=SagaTask, bind=True)(_step_task(runtime, step.name))
    sagas = {ORDER_SAGA.name: runtime.order_saga}

    @app.task(name=names.COMPLETE_ORDER, base=SagaTask, bind=True)
    def complete_order(self: Task, results: list[dict[str, Any]], saga_id: str) -> None:
        """Chord body: confirm the order, or compensate and cancel it (from the ledger)."""
        if runtime.poisoned(self.request):
            logger.error("saga %s: completion keeps crashing workers; left to the sweeper", saga_id)
            return
        done = runner.complete(
            runtime.engine,
            runtime.order_saga,
            UUID(saga_id),
            retry_after=runtime.recovery.compensation_retry,
        )
        record_completion(done)

    @app.task(name=names.RELAY_OUTBOX, base=HousekeepingTask)
    def relay() -> int:
        """Dispatch the sagas whose fast-path dispatch did not happen."""
        grace = timedelta(seconds=runtime.settings.outbox_grace_seconds)
        return relay_outbox(runtime.engine, app, DEFINITIONS, grace=grace)

    @app.task(name=names.SWEEP_SAGAS, base=HousekeepingTask)
    def sweep() -> dict[str, int]:
        """Redrive or finish the sagas past their deadline."""
        report = sweep_overdue(
            runtime.engine, app, sagas, runtime.recovery, on_complete=record_completion
        )
        return vars(report)

    if runtime.settings.bench_tasks:
        _register_bench_tasks(app, runtime)


def _register_bench_tasks(app: Celery, runtime: Runtime) -> None:
    """The bare chord the benchmark compares the saga with: no-op members, and a body
    that only notes when it ran."""

    @app.task(name=names.BENCH_NOOP, base=SagaTask)
    def noop(chord_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {"step": "noop", "status": "APPLIED", "reason": None}

    @app.task(name=names.BENCH_NOOP_DONE, base=SagaTask)
    def noop_done(results: list[dict[str, Any]], chord_id: str) -> None:
        runtime.redis.rpush("bench:done", f"{chord_id} {time.time()}")


def _step_task(runtime: Runtime, step: str) -> Callable[..., dict[str, Any]]:
    def run_step(self: Task, saga_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        saga = UUID(saga_id)
        if runtime.poisoned(self.request):
            logger.error("saga %s step %s keeps crashing workers: aborted", saga_id, step)
            return runner.abort_step(runtime.engine, saga, step, POISON_MESSAGE).to_message()
        started = time.perf_counter()
        try:
            outcome = runner.run_step(
                runtime.engine,
                runtime.order_saga,
                saga,
                step,
                payload,
                attempt=self.request.retries + 1,
                delay=runtime.settings.step_delay_seconds,
            )
        except TRANSIENT_ERRORS as exc:
            if self.request.retries < self.max_retries:
                raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
            logger.error("saga %s step %s: retries exhausted: %r", saga_id, step, exc)
            outcome = runner.abort_step(runtime.engine, saga, step, STEP_FAILED)
        except Exception:
            logger.exception("saga %s step %s failed", saga_id, step)
            outcome = runner.abort_step(runtime.engine, saga, step, STEP_FAILED)
        STEP_DURATION.labels(step).observe(time.perf_counter() - started)
        return outcome.to_message()

    run_step.__name__ = run_step.__qualname__ = step
    run_step.__doc__ = f"Chord header: the saga step {step!r}, once per saga."
    return run_step
