"""The workers' Prometheus metrics.

Pool children record saga and step durations, final states and retries; the worker's
main process serves them on ``WORKER_METRICS_PORT``, added up across children through
PROMETHEUS_MULTIPROC_DIR, together with figures read at scrape time: queue depth per
lane and the workers consuming it, the outbox backlog and its age, the active sagas,
the oldest of them and those past their deadline (what config/prometheus/alerts.yml
watches).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

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
HOUSEKEEPING_RUNS = Counter(
    "orders_housekeeping_runs_total",
    "Housekeeping runs finished (the relay, the sweepers, the events check, retention), by"
    " task: they send no task events and log nothing at INFO when they found nothing.",
    ["task"],
)
COMPENSATIONS_ESCALATED = Counter(
    "orders_compensations_escalated_total",
    "Sagas whose compensation failed COMPENSATION_MAX_ATTEMPTS times (now dead letters).",
)


class StackCollector(Collector):
    """Figures read when Prometheus scrapes: lanes, outbox, sagas not final."""

    def __init__(self, engine: Engine, redis: Redis, queues: tuple[str, ...]) -> None:
        self.engine = engine
        self.redis = redis
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        """Read the figures now; skip those whose store does not answer."""
        depth = GaugeMetricFamily(
            "orders_queue_depth", "Messages waiting, by lane.", labels=["lane"]
        )
        consumed = GaugeMetricFamily(
            "orders_lane_consumers",
            f"Workers that consumed the lane within the last {liveness.ALIVE_SECONDS:g} s.",
            labels=["lane"],
        )
        try:
            for lane in self.queues:
                depth.add_metric([lane], liveness.depth(self.redis, lane))
                consumed.add_metric([lane], liveness.consumers(self.redis, lane))
            yield depth
            yield consumed
        except Exception as exc:
            logger.warning("queue depth unavailable: %r", exc)
        # Ages are taken on the database's clock, in the statement that reads them.
        since = func.extract("epoch", func.now() - func.min(sagas.c.created_at))
        late = func.extract("epoch", func.now() - func.min(sagas.c.deadline_at))
        try:
            with self.engine.connect() as conn:
                backlog, oldest_entry = conn.execute(
                    select(
                        func.count(),
                        func.extract("epoch", func.now() - func.min(outbox.c.created_at)),
                    ).select_from(outbox)
                ).one()
                letters = conn.execute(
                    select(func.count())
                    .select_from(dead_letters)
                    .where(dead_letters.c.state == "OPEN")
                ).scalar_one()
                active = conn.execute(
                    select(
                        sagas.c.state,
                        func.count(),
                        since,
                        func.count().filter(sagas.c.deadline_at < func.now()),
                        late,
                    )
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
            "orders_outbox_oldest_age_seconds",
            "Age of the oldest saga not yet handed to the broker (0: none).",
            value=_seconds(oldest_entry),
        )
        yield GaugeMetricFamily(
            "orders_dead_letters_open", "Dead letters waiting for an operator.", value=letters
        )
        running = GaugeMetricFamily(
            "orders_sagas_active", "Sagas not final, by state.", labels=["state"]
        )
        oldest = GaugeMetricFamily(
            "orders_saga_oldest_age_seconds",
            "Age of the oldest saga not final, by state (0: none).",
            labels=["state"],
        )
        overdue = GaugeMetricFamily(
            "orders_sagas_overdue",
            "Sagas not final past their deadline, not yet taken up by the sweeper, by state.",
            labels=["state"],
        )
        most_overdue = GaugeMetricFamily(
            "orders_saga_most_overdue_seconds",
            "How long ago the deadline of the most overdue saga not final passed (0: none).",
            labels=["state"],
        )
        rows = {row[0]: row for row in active}
        for state in ACTIVE_STATES:
            _, count, age, past, lateness = rows.get(state.value, (state.value, 0, 0, 0, 0))
            running.add_metric([state.value], count)
            oldest.add_metric([state.value], _seconds(age))
            overdue.add_metric([state.value], past)
            most_overdue.add_metric([state.value], _seconds(lateness))
        yield running
        yield oldest
        yield overdue
        yield most_overdue


def _seconds(value: Decimal | float | None) -> float:
    """A number of seconds read from the database, never negative (None: 0)."""
    return 0.0 if value is None else max(0.0, float(value))


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
    """Count a decided saga and how long it took from acceptance (not a saga that only
    moved on to its next stage)."""
    if completion.decision is None or completion.decision.advances:
        return
    state = completion.decision.state.value
    SAGAS_FINISHED.labels(state).inc()
    if completion.escalated:
        COMPENSATIONS_ESCALATED.inc()
    if completion.created_at is not None:
        took = (datetime.now(UTC) - completion.created_at).total_seconds()
        SAGA_DURATION.labels(state).observe(took)
