"""The Celery app factory."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    task_retry,
    worker_init,
    worker_process_shutdown,
)

from config import gc_tuning, names, tracing
from config.celeryconf import celery_config
from config.logs import bind_log_context, clear_log_context, configure_logging, json_celery
from config.settings import Settings, load_settings
from workers.compat import apply_fixes
from workers.liveness import LaneHeartbeat
from workers.metrics import TASK_RETRIES, serve
from workers.runtime import Runtime
from workers.tasks import register_tasks
from workers.webhooks import register_webhook_tasks

#: The saga completions: their arguments are (step results, saga id).
_COMPLETIONS = frozenset({names.COMPLETE_ORDER, names.COMPLETE_REFUND})


def create_celery(settings: Settings | None = None, *, publisher: bool = False) -> Celery:
    """Build the Celery app. A ``publisher`` (the API) only sends messages: it registers
    no task and waits at most ``dispatch_timeout_seconds`` for the broker."""
    settings = settings or load_settings()
    config = celery_config(settings)
    if publisher:
        timeout = settings.dispatch_timeout_seconds
        config["broker_transport_options"] = {
            **config["broker_transport_options"],
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        config["result_backend_transport_options"] = {
            **config["result_backend_transport_options"],
            # The chord's size is written to the backend before the steps are sent: give
            # up at the first error too, and let the outbox relay dispatch later.
            "retry_policy": {"max_retries": 0},
        }
        config["redis_socket_timeout"] = timeout
        config["redis_socket_connect_timeout"] = timeout
    app = Celery("orders", set_as_current=False)
    app.config_from_object(config)
    apply_fixes(publisher=publisher)
    if not publisher:
        runtime = Runtime(settings)
        app.orders_runtime = runtime  # for the consumer (workers.consumer)
        register_tasks(app, runtime)
        register_webhook_tasks(app, runtime)
        app.steps["consumer"].add(LaneHeartbeat)
        _trace(app, settings)
        _connect_signals(app, runtime)
    return app


def _trace(app: Celery, settings: Settings) -> None:
    """When traces are on (config.tracing): the instrumentations now, before the task
    signals below are connected; the provider in the process that runs the tasks (a
    prefork child, or the worker itself), before its first task; a flush at its exit.
    The tasks beat sends every few seconds (the relay, the sweepers) start no trace."""
    if not tracing.enabled(settings):
        return

    def _provider(**_: Any) -> None:
        tracing.install_provider(settings, "orders-worker")

    def _flush(**_: Any) -> None:
        tracing.shutdown()

    task_prerun.connect(_provider, weak=False)  # first: the run span needs the provider
    worker_process_shutdown.connect(_flush, weak=False)
    schedule = app.conf.beat_schedule.values()
    periodic = [e["task"] for e in schedule if isinstance(e["schedule"], int | float)]
    tracing.instrument(settings, quiet_tasks=periodic)


def _connect_signals(app: Celery, runtime: Runtime) -> None:
    """Logging, log context per task, retry counts, and the metrics server."""
    settings = runtime.settings

    def _logging(**_: Any) -> None:
        configure_logging(settings)

    # Connected, this signal keeps Celery from installing its own log handlers.
    setup_logging.connect(_logging, weak=False)
    json_celery(app, settings)  # LOG_FORMAT=json: no banners, every line a record

    def _bind(task_id: str, task: Any, args: Any = (), **_: Any) -> None:
        delivery = getattr(task.request, "delivery_info", None) or {}
        # Steps are (saga id, payload); the completion is (step results, saga id).
        saga_id = args[-1] if task.name in _COMPLETIONS else (args or [None])[0]
        payload = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
        bind_log_context(
            task=task.name,
            task_id=task_id,
            lane=delivery.get("routing_key"),
            saga_id=saga_id,
            order_id=payload.get("order_id"),
        )
        if task.name.startswith("saga."):
            tracing.annotate(saga_id=saga_id, order_id=payload.get("order_id"))

    def _unbind(**_: Any) -> None:
        clear_log_context()

    def _count_retry(request: Any = None, **_: Any) -> None:
        TASK_RETRIES.labels(getattr(request, "task", "unknown")).inc()

    def _serve_metrics(**_: Any) -> None:
        if settings.worker_metrics_port:
            serve(settings, runtime.engine)

    def _settle_memory(**_: Any) -> None:
        # Before the pool forks: its children inherit a collector that skips what
        # startup built, and the watch on slow collections (config.gc_tuning).
        gc_tuning.freeze()
        gc_tuning.watch()

    task_prerun.connect(_bind, weak=False)
    task_postrun.connect(_unbind, weak=False)
    task_retry.connect(_count_retry, weak=False)
    worker_init.connect(_serve_metrics, weak=False)
    worker_init.connect(_settle_memory, weak=False)
