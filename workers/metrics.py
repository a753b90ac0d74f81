"""The workers' Prometheus metrics.

Pool children record saga and step durations, final states and retries; the worker's
main process serves them on ``WORKER_METRICS_PORT``, added up across children through
PROMETHEUS_MULTIPROC_DIR, together with figures read at scrape time: queue depth per
lane, the outbox backlog and the active sagas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis
from sqlalchemy import Engine, func, select

from config.redis_client import connect
from config.settings import Settings
from sagas.engine import ACTIVE_STATES
from sagas.runner import Completion
from sagas.tables import outbox, sagas
from workers import liveness
from workers.tables import dead_letters

logger = logging.getLogger(__name__)

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SAGA_DURATION = Histogram(
    "orders_saga_duration_seconds",
    "From acceptance to the saga's final state.",
    ["outcome"],
    buckets=SECONDS,
)
STEP_DURATION = Histogram(
    "orders_saga_step_duration_seconds", "Time one saga step took.", ["step"], buckets=SECONDS
)
SAGAS_FINISHED = Counter("orders_sagas_finished_total", "Sagas decided, by state.", ["state"])
TASK_RETRIES = Counter("orders_task_retries_total", "Task retries scheduled.", ["task"])
COMPENSATIONS_ESCALATED = Counter(
    "orders_compensations_escalated_total",
    "Sagas whose compensation failed COMPENSATION_MAX_ATTEMPTS times (now dead letters).",
)


class StackCollector(Collector):
    """Figures read when Prometheus scrapes: queues, outbox, active sagas."""

    def __init__(self, engine: Engine, redis: Redis, queues: tuple[str, ...]) -> None:
        self.engine = engine
        self.redis = redis
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        """Read the figures now; skip those whose store does not answer."""
        depth = GaugeMetricFamily(
            "orders_queue_depth", "Messages waiting, by lane.", labels=["lane"]
        )
        try:
            for lane in self.queues:
                depth.add_metric([lane], liveness.depth(self.redis, lane))
            yield depth
        except Exception as exc:
            logger.warning("queue depth unavailable: %r", exc)
        try:
            with self.engine.connect() as conn:
                backlog = conn.execute(select(func.count()).select_from(outbox)).scalar_one()
                letters = conn.execute(
                    select(func.count())
                    .select_from(dead_letters)
                    .where(dead_letters.c.state == "OPEN")
                ).scalar_one()
                active = conn.execute(
                    select(sagas.c.state, func.count())
                    .where(sagas.c.state.in_([s.value for s in ACTIVE_STATES]))
                    .group_by(sagas.c.state)
                ).all()
        except Exception as exc:
            logger.warning("database figures unavailable: %r", exc)
            return
        yield GaugeMetricFamily(
            "orders_outbox_backlog", "Sagas not yet handed to the broker.", value=backlog
        )
        yield GaugeMetricFamily(
            "orders_dead_letters_open", "Dead letters waiting for an operator.", value=letters
        )
        running = GaugeMetricFamily(
            "orders_sagas_active", "Sagas not final, by state.", labels=["state"]
        )
        counts: dict[str, int] = {state: count for state, count in active}
        for state in ACTIVE_STATES:
            running.add_metric([state.value], counts.get(state.value, 0))
        yield running


def serve(settings: Settings, engine: Engine) -> None:
    """Serve the metrics of every pool child, and the stack's figures, over HTTP."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    redis = connect(settings.broker_url, settings.sentinel, socket_timeout=1)
    registry.register(StackCollector(engine, redis, settings.queues))
    start_http_server(
        settings.worker_metrics_port, addr=settings.worker_metrics_bind, registry=registry
    )
    logger.info("metrics on %s:%d", settings.worker_metrics_bind, settings.worker_metrics_port)


def record_completion(completion: Completion) -> None:
    """Count a decided saga and how long it took from acceptance."""
    if completion.decision is None:
        return
    state = completion.decision.state.value
    SAGAS_FINISHED.labels(state).inc()
    if completion.escalated:
        COMPENSATIONS_ESCALATED.inc()
    if completion.created_at is not None:
        took = (datetime.now(UTC) - completion.created_at).total_seconds()
        SAGA_DURATION.labels(state).observe(took)
