"""The tasks: thin wrappers that parse primitives and call one function of ``sagas``.

The retry and dead-letter policy is the base class's (workers.base). A saga step never
fails its chord when it can help it: when it gives up, it records itself ABORTED, so the
chord's completion still runs and compensates. Only when even that cannot be written
(the database is down) does the step fail; the deadline sweeper then finishes the saga.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any
from uuid import UUID

from celery import Celery, Task
from redis.exceptions import ConnectionError as RedisConnectionError

from config import names
from config.schedules import window_key
from orders.events import check_all
from orders.projections import event_consumers
from orders.saga import DEFINITIONS
from sagas import runner
from sagas.canvas import complete_task_id
from sagas.engine import STEP_FAILED
from sagas.launch import relay_outbox
from sagas.recovery import sweep_overdue
from sagas.runner import SagaHandlers
from workers import batch, liveness, retention
from workers.base import PoisonMessageError, PolicyTask, briefly_retried, policy
from workers.escalation import escalate_compensation
from workers.metrics import HOUSEKEEPING_RUNS, STEP_DURATION, record_completion
from workers.runtime import Runtime

logger = logging.getLogger(__name__)

#: The reason recorded for a step whose message kept crashing its worker.
POISON_MESSAGE = "poison_message"


def register_tasks(app: Celery, runtime: Runtime) -> None:
    """Register every task of the system on ``app``, by the names in ``config.names``."""
    base = policy(runtime)
    housekeeping = _housekeeping(base)
    sagas = runtime.sagas
    for saga in sagas.values():
        for step in saga.definition.steps:
            _register_step(app, runtime, base, saga, step.name, step.task)

    @app.task(shared=False, name=names.COMPLETE_ORDER, base=base, swept=True)
    def complete_order(results: list[dict[str, Any]], saga_id: str) -> None:
        """Chord body (or, with the database join, a step's completion that failed in
        the step): confirm the order, or compensate and cancel it (from the ledger)."""
        _complete_sent(runtime, runtime.order_saga, saga_id)

    @app.task(shared=False, name=names.COMPLETE_REFUND, base=base, swept=True)
    def complete_refund(results: list[dict[str, Any]], saga_id: str) -> None:
        """Chord body of the refund saga (or a step's completion sent on its own): mark
        the order refunded, or take back what was returned (from the ledger)."""
        _complete_sent(runtime, runtime.refund_saga, saga_id)

    @app.task(shared=False, name=names.RELAY_OUTBOX, base=housekeeping)
    def relay() -> int:
        """Dispatch the sagas whose fast-path dispatch did not happen."""
        grace = timedelta(seconds=runtime.settings.outbox_grace_seconds)
        return relay_outbox(runtime.engine, app, DEFINITIONS, grace=grace)

    @app.task(shared=False, name=names.SWEEP_SAGAS, base=housekeeping)
    def sweep() -> dict[str, int]:
        """Redrive or finish the sagas past their deadline."""
        report = sweep_overdue(
            runtime.engine,
            app,
            sagas,
            runtime.recovery,
            lane_ready=lambda: _caught_up(runtime, runtime.settings.saga_queue),
            on_complete=record_completion,
            escalate=escalate_compensation,
        )
        return vars(report)

    @app.task(shared=False, name=names.CHECK_EVENTS, base=housekeeping)
    def check_events() -> dict[str, int]:
        """The integrity check: consumers' positions against the event log, for the
        orders changed recently and a batch of the sweep round all orders."""
        settings = runtime.settings
        return check_all(
            runtime.engine,
            event_consumers(runtime.caches),
            hold=settings.events_hold_seconds,
            margin=settings.events_check_margin_seconds,
            rows=settings.events_check_rows,
            sweep_rows=settings.events_sweep_rows,
        )

    @app.task(shared=False, name=names.RETAIN, base=housekeeping)
    def retain() -> dict[str, int]:
        """Remove what is finished and past its retention, a bounded batch per run."""
        policy = retention.RetentionPolicy.from_settings(runtime.settings)
        consumers = [consumer.name for consumer in event_consumers(runtime.caches)]
        return retention.run_retention(runtime.engine, policy, consumers)

    _register_batch_tasks(app, runtime, base)
    if runtime.settings.test_tasks:
        _register_test_tasks(app, runtime, base)
    if runtime.settings.bench_tasks:
        _register_bench_tasks(app, runtime, base)


def _housekeeping(base: type[PolicyTask]) -> type[PolicyTask]:
    """The housekeeping tasks' base: no retry (the next run comes soon), no dead letter,
    and no task events: beat sends them every few seconds, and Flower's task list is for
    the sagas (Celery's lines about their runs are dropped too: config.logs.QUIET_TASKS).
    Their runs are counted instead (``orders_housekeeping_runs_total``)."""

    class HousekeepingTask(base):  # type: ignore[valid-type,misc]
        abstract = True
        retries = 0
        dead_letters = False
        send_events = False

        def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
            HOUSEKEEPING_RUNS.labels(self.name).inc()

    return HousekeepingTask


def _complete_sent(runtime: Runtime, saga: SagaHandlers, saga_id: str) -> None:
    """A completion task: complete the saga unless a step is still running."""
    try:
        _complete(runtime, saga, UUID(saga_id))
    except runner.StepsPending:
        # Sent on its own while another step had not committed: that step completes
        # the saga when it does (or the sweeper, if it never does).
        logger.info("saga %s: a step is still running; it completes the saga", saga_id)


def _complete(
    runtime: Runtime, saga: SagaHandlers, saga_id: UUID, *, running_only: bool = False
) -> None:
    """Complete the saga (see ``runner.complete``) and count what was decided."""
    done = briefly_retried(
        lambda: runner.complete(
            runtime.engine,
            saga,
            saga_id,
            retry_after=runtime.recovery.compensation_wait,
            running_only=running_only,
            escalate=escalate_compensation,
        )
    )
    record_completion(done)


def _caught_up(runtime: Runtime, queue: str) -> bool:
    """Whether workers consume ``queue`` and have caught up with it; not when the broker
    cannot say (nothing could be sent to it anyway, and the sweep still completes what
    it can)."""
    try:
        return liveness.caught_up(runtime.redis, queue)
    except Exception as exc:
        logger.warning("cannot tell whether %s is consumed: %r", queue, exc)
        return False


def _register_batch_tasks(app: Celery, runtime: Runtime, base: type[PolicyTask]) -> None:
    """The batch credit check: a start per schedule tick, its chunks, and the sweep."""

    class StartTask(base):  # type: ignore[valid-type,misc]
        abstract = True

        def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            """Beat sends the start through here: the tick is read now, when it is sent,
            so that a start that waits in its lane still counts for its own tick."""
            if not args and not (kwargs or {}).get("window"):
                kwargs = {**(kwargs or {}), "window": window_key(runtime.settings)}
            return super().apply_async(args, kwargs, **options)

    @app.task(shared=False, name=names.START_CREDIT_CHECK, base=StartTask)
    def start_credit_check(window: str | None = None) -> str | None:
        """Start the run of this schedule tick (nothing if another beat did). The window
        comes with the message (read when beat sent it); without one, it is read now."""
        key = window or window_key(runtime.settings)
        run_id = batch.start_run(runtime.engine, app, runtime.settings, window=key)
        return str(run_id) if run_id else None

    class ChunkTask(base):  # type: ignore[valid-type,misc]
        abstract = True

        def fallback(self, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> Any:
            run_id, number, customer_ids = args
            briefly_retried(
                lambda: batch.fail_chunk(runtime.engine, UUID(run_id), number, len(customer_ids))
            )
            return None

    @app.task(shared=False, name=names.CREDIT_CHECK_CHUNK, base=ChunkTask)
    def credit_check_chunk(run_id: str, number: int, customer_ids: list[str]) -> int:
        """Review one chunk of customers."""
        return briefly_retried(
            lambda: batch.run_chunk(runtime.engine, UUID(run_id), number, customer_ids)
        )

    @app.task(shared=False, name=names.SWEEP_BATCH_RUNS, base=_housekeeping(base))
    def sweep_batch_runs() -> dict[str, int]:
        """Resume the runs that stopped moving (chunks unpublished or lost), or fail them."""
        ready = lambda: _caught_up(runtime, runtime.settings.batch_queue)  # noqa: E731
        return vars(batch.sweep_runs(runtime.engine, app, runtime.settings, lane_ready=ready))


def _register_test_tasks(app: Celery, runtime: Runtime, base: type[PolicyTask]) -> None:
    """Test only (TEST_TASKS=1, refused in production)."""

    @app.task(shared=False, name=names.TEST_FLAKY, base=base)
    def flaky(key: str) -> str:
        """Fails with a transient error while Redis holds ``testing:<key>:broken``;
        records the time of every attempt."""
        runtime.redis.rpush(f"testing:{key}:attempts", time.time())
        if runtime.redis.exists(f"testing:{key}:broken"):
            raise RedisConnectionError(f"testing: {key} is broken")
        runtime.redis.set(f"testing:{key}:done", "1")
        return "done"

    @app.task(shared=False, name=names.TEST_BATCH_NOOP, base=base)
    def batch_noop() -> None:
        """Stands for a small piece of batch work: 5 ms of CPU."""
        until = time.process_time() + 0.005
        while time.process_time() < until:
            pass


def _register_step(
    app: Celery,
    runtime: Runtime,
    base: type[PolicyTask],
    saga: SagaHandlers,
    step: str,
    name: str,
) -> None:
    """A saga step, taking effect once per saga. When it gives up (retries used up, an
    unexpected error, a poison message) it records the step as aborted and returns that
    outcome, so the saga's completion still compensates.

    Sent in a chord, it returns its outcome to the chord, whose body completes the saga.
    Sent alone (``SAGA_JOIN=database``), it completes the saga itself once its outcome
    has committed, if every step has one by then: of two steps finishing together, the
    later commit sees both outcomes (the sweeper covers a step that died in between)."""

    def join(task: Task, saga_id: UUID) -> None:
        if task.request.chord:
            return  # the chord's body completes the saga
        try:
            _complete(runtime, saga, saga_id, running_only=True)
        except runner.StepsPending:
            return  # the last step to finish completes it
        except Exception as exc:
            # The step is done; its completion goes on as a task of its own (its own
            # retries and dead letter), or, without a broker, to the sweeper.
            logger.warning("saga %s: completion failed, sent on its own: %r", saga_id, exc)
            try:
                app.send_task(
                    saga.definition.complete_task,
                    args=([], str(saga_id)),
                    task_id=complete_task_id(saga_id),
                    ignore_result=True,
                )
            except Exception:
                logger.warning("saga %s: completion left to the sweeper", saga_id, exc_info=True)

    class StepTask(base):  # type: ignore[valid-type,misc]
        abstract = True
        swept = True

        def fallback(self, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> Any:
            reason = POISON_MESSAGE if isinstance(exc, PoisonMessageError) else STEP_FAILED
            saga_id = UUID(args[0])
            outcome = briefly_retried(
                lambda: runner.abort_step(runtime.engine, saga_id, step, reason)
            )
            if reason != POISON_MESSAGE:
                # A message that keeps killing its worker may do so in the completion:
                # that saga is left to the sweeper.
                join(self, saga_id)
            return outcome.to_message()

    def run_step(self: Task, saga_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        outcome = briefly_retried(
            lambda: runner.run_step(
                runtime.engine,
                saga,
                UUID(saga_id),
                step,
                payload,
                attempt=self.request.retries + 1,
                delay=runtime.settings.step_delay_seconds,
            )
        )
        STEP_DURATION.labels(step).observe(time.perf_counter() - started)
        join(self, UUID(saga_id))
        return outcome.to_message()

    run_step.__name__ = run_step.__qualname__ = step
    run_step.__doc__ = f"The saga step {step!r}, once per saga."
    app.task(shared=False, name=name, base=StepTask, bind=True)(run_step)


def _register_bench_tasks(app: Celery, runtime: Runtime, base: type[PolicyTask]) -> None:
    """The bare chord the benchmark compares the saga with: no-op members, and a body
    that only notes when it ran."""

    @app.task(shared=False, name=names.BENCH_NOOP, base=base)
    def noop(chord_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {"step": "noop", "status": "APPLIED", "reason": None}

    @app.task(shared=False, name=names.BENCH_NOOP_DONE, base=base)
    def noop_done(results: list[dict[str, Any]], chord_id: str) -> None:
        runtime.redis.rpush("bench:done", f"{chord_id} {time.time()}")
