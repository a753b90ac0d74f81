"""The tasks: thin wrappers that parse primitives and call one function of ``sagas``.

The retry and dead-letter policy is the base class's (workers.base). A saga step never
fails its chord when it can help it: when it gives up, it records itself ABORTED, so the
chord's completion still runs and compensates. Only when even that cannot be written
(the database is down) does the step fail; the deadline sweeper then finishes the saga.

Sagas come from the runtime's registry (``Runtime.sagas``): one task per step task name
(the versions of a saga may share it) and one completion task per saga name. A step's
message names its version (none: version 1); a version this worker does not have makes
the message a dead letter at once, its step left without an outcome, for a worker that
has it to run after a replay. A completion that moves the saga on to its next stage
dispatches that stage after its commit.
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
from sagas import runner
from sagas.canvas import complete_task_id
from sagas.definition import Step
from sagas.engine import STEP_FAILED
from sagas.launch import dispatch_next_stage, relay_outbox
from sagas.recovery import sweep_overdue
from sagas.runner import Completion, SagaHandlers
from workers import batch, liveness, retention
from workers.base import PoisonMessageError, PolicyTask, briefly_retried, policy
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
    for task in sagas.step_tasks():
        _register_step(app, runtime, base, task)
    for name in sagas.names():
        _register_completion(app, runtime, base, sagas.latest(name).definition.complete_task)

    @app.task(shared=False, name=names.RELAY_OUTBOX, base=housekeeping)
    def relay() -> int:
        """Dispatch the sagas (or their next stages) whose dispatch did not happen."""
        grace = timedelta(seconds=runtime.settings.outbox_grace_seconds)
        return relay_outbox(runtime.engine, app, sagas, grace=grace)

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
            escalate=runtime.escalate,
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


def _register_completion(app: Celery, runtime: Runtime, base: type[PolicyTask], name: str) -> None:
    """The completion task of one saga name (all its versions: the saga's row says which
    one it runs on): the chord body of each stage, or a step's completion sent on its
    own. It decides the running stage from the ledger: moves the saga on to its next
    stage (and dispatches it), confirms it, or compensates and cancels it."""

    def complete(results: list[dict[str, Any]], saga_id: str) -> None:
        try:
            _complete(app, runtime, UUID(saga_id))
        except runner.StepsPending:
            # Sent on its own while another step had not committed (that step completes
            # the stage when it does, or the sweeper if it never does), or a duplicate
            # of an earlier stage's completion (the saga has moved on): nothing to do.
            logger.info("saga %s: its running stage has steps without an outcome", saga_id)

    complete.__name__ = complete.__qualname__ = name.rpartition(".")[2] or "complete"
    complete.__doc__ = f"The completion of each stage of the sagas completed by {name!r}."
    app.task(shared=False, name=name, base=base, swept=True)(complete)


def _complete(app: Celery, runtime: Runtime, saga_id: UUID, *, running_only: bool = False) -> None:
    """Complete the saga's running stage (see ``runner.complete``; its handlers by the
    saga row's name and version), count what was decided, and dispatch the next stage
    if the saga moved on to one."""
    done = briefly_retried(
        lambda: runner.complete(
            runtime.engine,
            runtime.sagas,
            saga_id,
            retry_after=runtime.recovery.compensation_wait,
            running_only=running_only,
            escalate=runtime.escalate,
            deadline=runtime.recovery.deadline,
        )
    )
    _carry_on(app, runtime, done)


def _carry_on(app: Celery, runtime: Runtime, done: Completion) -> None:
    """Count a decided saga; publish the stage a saga moved on to (its outbox entry
    covers a publish that fails)."""
    record_completion(done)
    dispatch_next_stage(app, done, runtime.outbox_clearer.add)


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


def _register_step(app: Celery, runtime: Runtime, base: type[PolicyTask], task_name: str) -> None:
    """A saga step's task, taking effect once per saga. Its message's ``version`` (none:
    1) picks the saga version's handlers and step; a version not deployed here raises
    UnknownSagaVersion, which the policy turns into a dead letter at once, the step left
    without an outcome. When the step gives up otherwise (retries used up, an unexpected
    error, a poison message) it records the step as aborted and returns that outcome,
    so the saga's completion still compensates.

    Sent in a chord, it returns its outcome to the chord, whose body completes the
    stage. Sent alone (``SAGA_JOIN=database``, or a stage of one step), it takes the
    saga's lock first, so the steps of a stage take turns, and the last of them decides
    the stage in its own transaction (``runner.run_step_and_complete``); a redelivered
    step, or one whose decision failed, completes the stage after its commit instead
    (the sweeper covers a step that died)."""
    sagas = runtime.sagas

    def resolve(kwargs: dict[str, Any]) -> tuple[SagaHandlers, Step]:
        return sagas.step(task_name, _version(kwargs.get("version")))

    def join(task: Task, saga_id: UUID, definition_stage: tuple[str, int]) -> None:
        if task.request.chord:
            return  # the chord's body completes the stage
        try:
            _complete(app, runtime, saga_id, running_only=True)
        except runner.StepsPending:
            return  # the last step of the stage to finish completes it
        except Exception as exc:
            # The step is done; its completion goes on as a task of its own (its own
            # retries and dead letter), or, without a broker, to the sweeper.
            complete_task, stage = definition_stage
            logger.warning("saga %s: completion failed, sent on its own: %r", saga_id, exc)
            try:
                app.send_task(
                    complete_task,
                    args=([], str(saga_id)),
                    task_id=complete_task_id(saga_id, stage),
                    ignore_result=True,
                )
            except Exception:
                logger.warning("saga %s: completion left to the sweeper", saga_id, exc_info=True)

    class StepTask(base):  # type: ignore[valid-type,misc]
        abstract = True
        swept = True

        def fallback(self, args: tuple[Any, ...], kwargs: dict[str, Any], exc: Exception) -> Any:
            try:
                saga, step = resolve(kwargs)
                saga_id = UUID(args[0])
            except (LookupError, TypeError, ValueError, IndexError):
                # Not a version deployed here (UnknownSagaVersion), or not a message this
                # task can read: its dead letter is all there is; no outcome is recorded,
                # so that a worker that has the version runs the step after a replay.
                return None
            reason = POISON_MESSAGE if isinstance(exc, PoisonMessageError) else STEP_FAILED
            outcome = briefly_retried(
                lambda: runner.abort_step(runtime.engine, saga_id, step.name, reason)
            )
            if reason != POISON_MESSAGE:
                # A message that keeps killing its worker may do so in the completion:
                # that saga is left to the sweeper.
                definition = saga.definition
                join(self, saga_id, (definition.complete_task, definition.stage_of(step.name)))
            return outcome.to_message()

    def run_step(
        self: Task, saga_id: str, payload: dict[str, Any], version: int = 1
    ) -> dict[str, Any]:
        saga, step = resolve({"version": version})
        started = time.perf_counter()
        definition = saga.definition
        if self.request.chord:
            outcome = briefly_retried(
                lambda: runner.run_step(
                    runtime.engine,
                    saga,
                    UUID(saga_id),
                    step.name,
                    payload,
                    attempt=self.request.retries + 1,
                    delay=runtime.settings.step_delay_seconds,
                )
            )
            STEP_DURATION.labels(step.name).observe(time.perf_counter() - started)
            return outcome.to_message()
        # Sent alone: the stage's last step decides it in its own transaction.
        run = briefly_retried(
            lambda: runner.run_step_and_complete(
                runtime.engine,
                saga,
                sagas,
                UUID(saga_id),
                step.name,
                payload,
                attempt=self.request.retries + 1,
                delay=runtime.settings.step_delay_seconds,
                deadline=runtime.recovery.deadline,
            )
        )
        STEP_DURATION.labels(step.name).observe(time.perf_counter() - started)
        if run.completion is not None:
            _carry_on(app, runtime, run.completion)
        if not run.decided:
            join(self, UUID(saga_id), (definition.complete_task, definition.stage_of(step.name)))
        return run.outcome.to_message()

    label = task_name.rpartition(".")[2] or task_name
    run_step.__name__ = run_step.__qualname__ = label
    run_step.__doc__ = f"The saga step run by {task_name!r}, once per saga."
    app.task(shared=False, name=task_name, base=StepTask, bind=True)(run_step)


def _version(given: Any) -> int:
    """A step message's version: none means 1; anything but a whole number is refused."""
    if given is None:
        return 1
    if isinstance(given, bool) or not isinstance(given, int):
        raise TypeError(f"a saga version is a whole number, not {given!r}")
    return given


def _register_bench_tasks(app: Celery, runtime: Runtime, base: type[PolicyTask]) -> None:
    """The bare chord the benchmark compares the saga with: no-op members, and a body
    that only notes when it ran."""

    @app.task(shared=False, name=names.BENCH_NOOP, base=base)
    def noop(chord_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        return {"step": "noop", "status": "APPLIED", "reason": None}

    @app.task(shared=False, name=names.BENCH_NOOP_DONE, base=base)
    def noop_done(results: list[dict[str, Any]], chord_id: str) -> None:
        runtime.redis.rpush("bench:done", f"{chord_id} {time.time()}")
