"""Flower, as the Procfile runs it (basic auth, loopback, a URL prefix), shows our
workers and a finished saga's tasks through its own REST API."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import Engine, select

from config.settings import Settings
from orders.tables import orders
from scripts.services import wait_for_port
from tests.conftest import Servers
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product, wait_for

pytestmark = pytest.mark.e2e

AUTH = ("operator", "flower-test-password")


@pytest.fixture(scope="module")
def flowered(settings: Settings, servers: Servers) -> Iterator[Stack]:
    own = replace(
        settings, broker_url=servers.redis.url(12), result_backend_url=servers.redis.url(13)
    )
    stack = Stack(
        own, servers.base / "e2e-flower", flower_auth=":".join(AUTH), flower_prefix="flower"
    )
    try:
        stack.start()
        wait_for_port(stack.flower_port, 30)
        yield stack
    finally:
        stack.stop()


def test_flower_shows_the_workers_and_a_finished_sagas_tasks(
    flowered: Stack, engine: Engine
) -> None:
    base = f"http://127.0.0.1:{flowered.flower_port}/flower"
    api = flowered.client()
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    order_id = api.place(customer, [(product, 1)]).json()["order_id"]
    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    with engine.connect() as conn:
        saga_id = str(
            conn.execute(select(orders.c.saga_id).where(orders.c.id == order_id)).scalar_one()
        )

    workers = wait_for(
        "Flower to see the worker",
        lambda: httpx.get(
            f"{base}/api/workers", params={"refresh": "1"}, auth=AUTH, timeout=10
        ).json(),
    )
    assert any(name.startswith(f"worker-{flowered.api_port}@") for name in workers)

    def saga_tasks() -> dict[str, Any] | None:
        tasks = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=10).json()
        mine = {t["name"]: t for t in tasks.values() if str(t.get("uuid", "")).startswith(saga_id)}
        return mine if len(mine) == 3 else None

    tasks = wait_for("Flower to list the saga's three tasks", saga_tasks, timeout=20)
    assert set(tasks) == {
        "saga.order.reserve_stock",
        "saga.order.reserve_credit",
        "saga.order.complete",
    }
    assert {t["state"] for t in tasks.values()} == {"SUCCESS"}


def test_flower_needs_its_password_and_listens_on_loopback_only(flowered: Stack) -> None:
    base = f"http://127.0.0.1:{flowered.flower_port}/flower"
    assert httpx.get(f"{base}/api/workers").status_code == 401
    assert httpx.get(f"{base}/api/workers", auth=("operator", "wrong")).status_code == 401
    assert (
        httpx.get(f"http://127.0.0.1:{flowered.flower_port}/api/workers", auth=AUTH).status_code
        == 404
    )  # only under its prefix
    flower = flowered.service("flower")
    assert flower.process is not None
    listening = {
        conn.laddr.ip
        for proc in [psutil.Process(flower.process.pid)]
        for conn in proc.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}
