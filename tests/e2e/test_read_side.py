"""The read side on the real processes: the event consumers' process keeps the caches and
the customer summaries fresh while orders flow; no read is stale once its event is
applied, and the staleness seen under load is printed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from uuid import UUID

import httpx
import pytest
from sqlalchemy import Engine, func, select

from config.settings import Settings
from orders import events
from orders.tables import orders
from tests.conftest import API_KEY, Servers
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product, credit_of

pytestmark = pytest.mark.e2e

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ORDERS = 120
FINAL = {"CONFIRMED", "CANCELLED"}


@pytest.fixture(scope="module")
def read_stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    own = replace(
        settings,
        broker_url=servers.redis.url(50),
        result_backend_url=servers.redis.url(51),
        cache_url=servers.redis.url(52),
    )
    stack = Stack(own, servers.base / "e2e-reads", events=True, worker_concurrency=3)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def wait_for(what: str, check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_reads_follow_the_orders_under_load_and_none_is_stale_once_applied(
    read_stack: Stack, engine: Engine
) -> None:
    customer = add_customer(engine, limit="900.00")  # room for about 2/3 of the orders
    product = add_product(engine, on_hand=1000, price="10.00")
    http = httpx.Client(base_url=read_stack.api_url, headers=AUTH, timeout=10)
    placed: list[str] = []
    seen: list[tuple[float, dict[str, str]]] = []  # (wall time, order -> status)
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=read_stack.api_url, headers=AUTH, timeout=10) as reader:
            while not done.is_set():
                ids = placed[-100:]
                if not ids:
                    time.sleep(0.01)
                    continue
                body = reader.get("/orders/status", params={"ids": ",".join(ids)}).json()
                seen.append((time.time(), {s["order_id"]: s["status"] for s in body["statuses"]}))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(ORDERS):  # about 40 orders/s, while the watcher reads
            response = http.post(
                "/orders",
                json={"customer_id": customer, "lines": [{"product_id": product, "quantity": 1}]},
            )
            assert response.status_code == 202
            placed.append(response.json()["order_id"])
            time.sleep(0.025)
        ids = [UUID(i) for i in placed]

        def all_final() -> dict[UUID, datetime] | None:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(orders.c.id, orders.c.updated_at)
                    .where(orders.c.id.in_(ids))
                    .where(orders.c.status.in_(FINAL))
                ).all()
            return dict(rows) if len(rows) == ORDERS else None

        decided = wait_for("every order to be final", all_final)
        wait_for("the caches consumer to catch up", lambda: events.lag(engine, "caches") == 0)
        wait_for("the summaries to catch up", lambda: events.lag(engine, "customer_summary") == 0)
    finally:
        done.set()
        watcher.join(10)

    # Once applied, no read is stale: every order reads final, one by one and in a batch.
    batch = http.get("/orders/status", params={"ids": ",".join(placed[:100])}).json()
    assert {s["status"] for s in batch["statuses"]} <= FINAL and len(batch["statuses"]) == 100
    for order_id in placed:
        assert http.get(f"/orders/{order_id}/status").json()["status"] in FINAL

    # Under load: how long after an order became final did a read still show it pending?
    stale = [0.0]
    for at, statuses in seen:
        for order_id, status in statuses.items():
            final_at = decided[UUID(order_id)].timestamp()
            if status not in FINAL and at > final_at:
                stale.append(at - final_at)
    print(
        f"\n{len(seen)} batch reads during {ORDERS} orders; longest staleness seen "
        f"{max(stale) * 1000:.0f} ms ({len(stale) - 1} stale observations)"
    )

    with engine.connect() as conn:
        truth = dict(
            conn.execute(
                select(orders.c.status, func.count())
                .where(orders.c.customer_id == customer)
                .group_by(orders.c.status)
            ).all()
        )
    summary = http.get(f"/customers/{customer}/summary").json()
    assert (summary["orders_placed"], summary["orders_confirmed"], summary["orders_cancelled"]) == (
        ORDERS,
        truth.get("CONFIRMED", 0),
        truth.get("CANCELLED", 0),
    )
    assert Decimal(summary["confirmed_total"]) == Decimal(10 * truth.get("CONFIRMED", 0))
    credit = http.get(f"/customers/{customer}/credit").json()
    figures = credit_of(engine, customer)
    assert (Decimal(credit["used"]), Decimal(credit["reserved"])) == (
        figures.used,
        figures.reserved,
    )
    http.close()
