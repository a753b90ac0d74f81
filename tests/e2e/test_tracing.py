"""One trace per order: through real gunicorn and worker processes, the API's POST span
is the root of the publish, both steps and the completion; the outbox relay's dispatch
joins the trace stored with the saga; the trace id is in the logs and on the timeline."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from sqlalchemy import Engine, select, update

from config import names
from config.celeryconf import celery_config
from config.settings import Settings
from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.tables import orders
from sagas.tables import sagas
from tests.conftest import Servers
from tests.fakes import RecordingLauncher
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product, wait_for

pytestmark = pytest.mark.e2e

STEPS = ("run/saga.order.reserve_stock", "run/saga.order.reserve_credit")
COMPLETE = "run/saga.order.complete"


@pytest.fixture(scope="module")
def traced(settings: Settings, servers: Servers) -> Iterator[tuple[Stack, Path]]:
    own = replace(
        settings, broker_url=servers.redis.url(14), result_backend_url=servers.redis.url(15)
    )
    Redis.from_url(own.broker_url).flushdb()
    directory = servers.base / "e2e-traced"
    directory.mkdir(parents=True, exist_ok=True)
    spans = directory / "spans.jsonl"
    spans.unlink(missing_ok=True)
    stack = Stack(
        own,
        directory,
        beat=True,  # the outbox relay
        extra_env={
            "TRACES_FILE": str(spans),
            # Exported a tenth of a second after they end (the SDK's default: 5 s).
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "LOG_FORMAT": "json",
        },
    )
    try:
        stack.start()
        yield stack, spans
    finally:
        stack.stop()


def read_spans(path: Path) -> list[dict[str, Any]]:
    """Every span exported so far (one JSON object a line)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trace_of(path: Path, trace_id: str, names: set[str]) -> list[dict[str, Any]] | None:
    """The trace's spans once every one of ``names`` is among them, else None."""
    found = [s for s in read_spans(path) if s["context"]["trace_id"] == trace_id]
    return found if names <= {s["name"] for s in found} else None


def records(stack: Stack, service: str) -> list[dict[str, Any]]:
    lines = stack.service(service).log().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_one_order_is_one_trace_from_the_request_to_the_completion(
    traced: tuple[Stack, Path], engine: Engine
) -> None:
    stack, path = traced
    api = stack.client()
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    order_id = str(api.place(customer, [(product, 1)]).json()["order_id"])
    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"

    def root() -> dict[str, Any] | None:
        return next(
            (
                s
                for s in read_spans(path)
                if s["name"] == "POST /orders" and s["attributes"].get("order_id") == order_id
            ),
            None,
        )

    request = wait_for("the request's span", root, timeout=15)
    assert request["parent_id"] is None
    assert request["kind"] == "SpanKind.SERVER"
    saga_id = request["attributes"]["saga_id"]
    trace_id = request["context"]["trace_id"]

    spans = wait_for(
        "the steps' and the completion's spans in the request's trace",
        lambda: trace_of(path, trace_id, {*STEPS, COMPLETE}),
        timeout=15,
    )
    by_id = {s["context"]["span_id"]: s for s in spans}
    for run in (s for s in spans if s["name"] in (*STEPS, COMPLETE)):
        assert run["attributes"]["saga_id"] == saga_id
        if run["name"] in STEPS:
            assert run["attributes"]["order_id"] == order_id
        # Every span leads up to the request's, within the trace.
        chain, span = [], run
        while span["parent_id"] is not None:
            span = by_id[span["parent_id"]]
            chain.append(span["name"])
        assert span["context"] == request["context"], (run["name"], chain)
    publishes = {s["name"] for s in spans if s["name"].startswith("apply_async/")}
    # Both steps from the API, the completion from the worker that ran the last step.
    assert publishes >= {f"apply_async/{name.removeprefix('run/')}" for name in (*STEPS, COMPLETE)}
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {
        "orders-api",
        "orders-worker",
    }
    # The statements run for the order are in its trace too.
    assert any(key.startswith("db.") for s in spans for key in s["attributes"])

    # The trace id is on the timeline (JSON and page) and in the log lines of the order.
    plain = trace_id.removeprefix("0x")
    assert api.http.get(f"/orders/{order_id}/timeline").json()["trace_id"] == plain
    assert plain in api.http.get(f"/orders/{order_id}/timeline.html").text
    accepted = [r for r in records(stack, "web") if r.get("order_id") == order_id]
    assert accepted and all(r.get("trace_id") == plain for r in accepted)
    steps = wait_for(
        "the worker's records of the saga",
        lambda: [r for r in records(stack, "worker") if r.get("saga_id") == saga_id],
        timeout=10,
    )
    assert all(r.get("trace_id") == plain for r in steps if "task" in r)


def test_the_relay_dispatches_a_saga_in_the_trace_that_accepted_it(
    traced: tuple[Stack, Path], engine: Engine, settings: Settings
) -> None:
    _, path = traced
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    # Accepted with its outbox entry, never dispatched: the relay's work. The trace
    # context stands for the request that accepted it.
    command = PlaceOrder(customer, (OrderLine(product, 1),), client="tests")
    accepted = services.place_order(engine, command, RecordingLauncher())
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    with engine.begin() as conn:
        conn.execute(
            update(sagas)
            .where(sagas.c.id == accepted.saga_id)
            .values(trace_context=f"00-{trace_id}-{parent}-01")
        )

    def confirmed() -> bool:
        with engine.connect() as conn:
            status = conn.execute(select(orders.c.status).where(orders.c.id == accepted.order_id))
            return status.scalar() == "CONFIRMED"

    wait_for("the relayed saga to confirm the order", confirmed, timeout=30)
    spans = wait_for(
        "the relayed saga's spans",
        lambda: trace_of(path, f"0x{trace_id}", {"outbox relay", *STEPS, COMPLETE}),
        timeout=15,
    )
    relays = [s for s in spans if s["name"] == "outbox relay"]
    assert all(relay["parent_id"] == f"0x{parent}" for relay in relays)
    assert all(relay["attributes"]["saga_id"] == str(accepted.saga_id) for relay in relays)
    by_id = {s["context"]["span_id"]: s for s in spans}
    for run in (s for s in spans if s["name"] in (*STEPS, COMPLETE)):
        span = run
        while span["parent_id"] in by_id:
            span = by_id[span["parent_id"]]
        assert span["name"] == "outbox relay", run["name"]
    # The relay's own runs (every second), and the other tasks beat sends every few
    # seconds, start no trace of their own.
    schedule = celery_config(settings)["beat_schedule"].values()
    periodic = {f"run/{e['task']}" for e in schedule if isinstance(e["schedule"], int | float)}
    assert names.RELAY_OUTBOX in {e["task"] for e in schedule}
    assert not [s for s in read_spans(path) if s["name"] in periodic]
