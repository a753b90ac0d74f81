"""What operators see: Prometheus metrics from the API and the workers, and JSON log
lines that carry the order, the saga, the task and the lane."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from config.settings import Settings
from scripts.services import free_port
from tests.conftest import Servers
from tests.harness.client import Api
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def observed(settings: Settings, servers: Servers) -> Iterator[tuple[Stack, int]]:
    from dataclasses import replace

    port = free_port()
    own = replace(
        settings, broker_url=servers.redis.url(8), result_backend_url=servers.redis.url(9)
    )
    stack = Stack(
        own,
        servers.base / "e2e-observed",
        extra_env={"LOG_FORMAT": "json", "WORKER_METRICS_PORT": str(port)},
    )
    try:
        stack.start()
        yield stack, port
    finally:
        stack.stop()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def confirm_one_order(api: Api, engine: Engine) -> str:
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    order_id = str(api.place(customer, [(product, 1)]).json()["order_id"])
    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    return order_id


def test_the_api_and_the_workers_expose_metrics_that_move_with_a_saga(
    observed: tuple[Stack, int], engine: Engine
) -> None:
    stack, worker_port = observed
    api = stack.client()
    worker_metrics = f"http://127.0.0.1:{worker_port}/metrics"
    before = samples(httpx.get(worker_metrics).text)
    confirm_one_order(api, engine)

    api_page = samples(httpx.get(f"{stack.api_url}/metrics").text)
    assert (
        api_page[
            (
                "orders_api_requests_total",
                (("method", "POST"), ("route", "/orders"), ("status", "202")),
            )
        ]
        >= 1
    )
    assert (
        api_page[
            (
                "orders_api_request_duration_seconds_count",
                (("method", "POST"), ("route", "/orders")),
            )
        ]
        >= 1
    )

    def moved() -> dict | None:
        page = samples(httpx.get(worker_metrics).text)
        key = ("orders_sagas_finished_total", (("state", "CONFIRMED"),))
        return page if page.get(key, 0) > before.get(key, 0) else None

    page = wait_for("the workers' metrics to count the saga", moved, timeout=10)
    assert page[("orders_saga_duration_seconds_count", (("outcome", "CONFIRMED"),))] >= 1
    for step in ("reserve_stock", "reserve_credit"):
        assert page[("orders_saga_step_duration_seconds_count", (("step", step),))] >= 1
    assert ("orders_queue_depth", (("lane", "saga.high"),)) in page
    assert ("orders_outbox_backlog", ()) in page
    assert ("orders_dead_letters_open", ()) in page
    assert ("orders_sagas_active", (("state", "RUNNING"),)) in page


def test_log_lines_are_json_and_carry_the_order_the_saga_the_task_and_the_lane(
    observed: tuple[Stack, int], engine: Engine
) -> None:
    stack, _ = observed
    order_id = confirm_one_order(stack.client(), engine)

    def records(service: str) -> list[dict]:
        lines = stack.service(service).log().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    accepted = [r for r in records("web") if r.get("order_id") == order_id]
    assert accepted and accepted[0]["message"].startswith("order accepted")
    saga_id = accepted[0]["saga_id"]
    steps = wait_for(
        "the worker's records of the saga",
        lambda: [r for r in records("worker") if r.get("saga_id") == saga_id and "task" in r],
        timeout=10,
    )
    assert {r["task"] for r in steps} >= {
        "saga.order.reserve_stock",
        "saga.order.reserve_credit",
        "saga.order.complete",
    }
    assert all(r["lane"] == "saga.high" for r in steps)
    assert any(r.get("order_id") == order_id for r in steps)
