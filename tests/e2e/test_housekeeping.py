"""Housekeeping cannot starve the relay: while the events integrity check is stuck (a
lock it needs is held), the outbox relay still dispatches an accepted order on time."""

from __future__ import annotations

import time
from dataclasses import replace

from redis import Redis
from sqlalchemy import Engine, func, select, text
from sqlalchemy.dialects.postgresql import insert

from config.settings import Settings
from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.projections import CustomerSummaries
from orders.tables import consumer_checkpoints, orders
from tests.conftest import Servers
from tests.fakes import RecordingLauncher
from tests.harness.processes import Stack, WorkerSpec
from tests.helpers import add_customer, add_product, wait_for

#: The check's consumers in a stack without caches.
CONSUMERS = [CustomerSummaries.name]
#: A generous bound on an order accepted without its dispatch: the relay's grace (2 s),
#: its period (1 s) and the saga; the check is held far longer than this.
ON_TIME = 15.0


def check_waiting(engine: Engine) -> bool:
    """Whether the integrity check waits on the lock of a consumer's checkpoint."""
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND (query LIKE '%FROM consumer_checkpoints%FOR UPDATE%'"
                    # prepared (config.database.prepared): its name shows
                    " OR query LIKE 'EXECUTE lock_checkpoint(%')"
                )
            ).scalar()
        )


def accepted_without_dispatch(engine: Engine, customer: str, product: str) -> object:
    """An order written with its outbox record, its saga never sent: the relay's work."""
    command = PlaceOrder(customer, (OrderLine(product, 1),), client="tests")
    return services.place_order(engine, command, RecordingLauncher()).order_id


def status(engine: Engine, order_id: object) -> str:
    with engine.connect() as conn:
        return str(conn.execute(select(orders.c.status).where(orders.c.id == order_id)).scalar())


def test_the_relay_dispatches_on_time_while_a_long_integrity_check_runs(
    engine: Engine, settings: Settings, servers: Servers
) -> None:
    own = replace(
        settings, broker_url=servers.redis.url(36), result_backend_url=servers.redis.url(37)
    )
    Redis.from_url(own.broker_url).flushdb()
    stack = Stack(
        own,
        servers.base / "e2e-housekeeping",
        worker_specs=[
            WorkerSpec("worker-saga", "saga.high", concurrency=2),
            WorkerSpec("worker-default", "default", concurrency=1),
            WorkerSpec("worker-housekeeping", "housekeeping", concurrency=1),
        ],
        beat=True,
        extra_env={
            "EVENTS_CHECK_EVERY_SECONDS": "1",
            "EVENTS_HOLD_SECONDS": "0",
            # The stuck check waits for the lock well past the test.
            "DB_LOCK_TIMEOUT_SECONDS": "50",
        },
    )
    customer, product = add_customer(engine, limit="1000.00"), add_product(engine, on_hand=10)
    with engine.begin() as conn:
        conn.execute(
            insert(consumer_checkpoints)
            .values([{"consumer": c, "last_id": 0, "updated_at": func.now()} for c in CONSUMERS])
            .on_conflict_do_nothing()
        )
    held = engine.connect()
    try:
        stack.start()
        # The test holds every consumer's checkpoint: a check that finds an order behind
        # (this one: no consumer runs here) waits for it, on the housekeeping lane.
        held.execute(
            select(consumer_checkpoints.c.consumer)
            .where(consumer_checkpoints.c.consumer.in_(CONSUMERS))
            .with_for_update()
        ).all()
        first = accepted_without_dispatch(engine, customer, product)
        wait_for("the integrity check to wait on the lock", lambda: check_waiting(engine))
        wait_for("the first order", lambda: status(engine, first) == "CONFIRMED", timeout=ON_TIME)

        # The check is still stuck; the relay goes on.
        assert check_waiting(engine)
        started = time.monotonic()
        second = accepted_without_dispatch(engine, customer, product)
        wait_for("the second order", lambda: status(engine, second) == "CONFIRMED", timeout=ON_TIME)
        assert check_waiting(engine), "the check stopped waiting: the test proved nothing"
        print(f"relayed and confirmed in {time.monotonic() - started:.1f} s")
    finally:
        held.rollback()
        held.close()
        stack.stop()
