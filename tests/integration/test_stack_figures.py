"""The figures a worker reads from PostgreSQL and Redis when Prometheus scrapes it, which
the alert rules watch: the oldest saga not final, those past their deadline, the outbox's
oldest entry, and the workers consuming each lane."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from prometheus_client import CollectorRegistry
from redis import Redis
from sqlalchemy import Engine, delete

from sagas.store import create_saga
from sagas.tables import sagas
from tests.conftest import Servers
from workers import liveness
from workers.metrics import StackCollector

RUNNING = (("state", "RUNNING"),)
FAILED = (("state", "COMPENSATION_FAILED"),)


@pytest.fixture
def redis(servers: Servers) -> Iterator[Redis]:
    client = Redis.from_url(servers.redis.url(10))
    client.flushdb()
    yield client
    client.flushdb()


def scrape(collector: StackCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The collector's samples, by name and labels, as one scrape reads them."""
    registry = CollectorRegistry()
    registry.register(collector)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def test_a_scrape_reports_a_forgotten_saga_its_outbox_entry_and_each_lanes_consumers(
    engine: Engine, redis: Redis
) -> None:
    # Given a saga accepted an hour ago, never published, its deadline 10 minutes gone
    now = datetime.now(UTC)
    saga_id = uuid4()
    with engine.begin() as conn:
        create_saga(
            conn,
            saga_id,
            "order",
            {"order_id": str(uuid4())},
            now=now - timedelta(hours=1),
            deadline_at=now - timedelta(minutes=10),
        )
    # ... and one worker consuming one of two lanes
    liveness.mark(redis, ["figures.a"], "worker@test")
    try:
        # When a worker is scraped
        figures = scrape(StackCollector(engine, redis, ("figures.a", "figures.b")))
    finally:
        with engine.begin() as conn:  # its outbox entry goes with it
            conn.execute(delete(sagas).where(sagas.c.id == saga_id))
    # Then (other tests' sagas may be older still)
    assert figures[("orders_saga_oldest_age_seconds", RUNNING)] >= 3600
    assert figures[("orders_sagas_overdue", RUNNING)] >= 1
    assert figures[("orders_saga_most_overdue_seconds", RUNNING)] >= 600
    assert figures[("orders_outbox_oldest_age_seconds", ())] >= 3600
    assert figures[("orders_outbox_backlog", ())] >= 1
    assert figures[("orders_lane_consumers", (("lane", "figures.a"),))] == 1
    assert figures[("orders_lane_consumers", (("lane", "figures.b"),))] == 0
    assert figures[("orders_queue_depth", (("lane", "figures.b"),))] == 0
    # Every state is reported, none with a negative age
    for name in ("orders_saga_oldest_age_seconds", "orders_saga_most_overdue_seconds"):
        assert figures[(name, FAILED)] >= 0
    assert ("orders_sagas_overdue", FAILED) in figures
