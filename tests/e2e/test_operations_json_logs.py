"""Operated like the rest of a stack: every process (the API, a worker per lane, the event
consumers, beat) answers Prometheus on its port; with LOG_FORMAT=json every line any of
them writes, from start to shutdown, is a JSON object; and the housekeeping beat sends
every second neither sends task events (Flower's list stays the sagas') nor fills the log.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from config import names
from config.logs import QUIET_TASKS
from config.settings import Settings
from scripts.services import free_port
from tests.conftest import Servers
from tests.harness.processes import Stack, WorkerSpec
from tests.helpers import add_customer, add_product, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def operated(settings: Settings, servers: Servers) -> Iterator[tuple[Stack, dict[str, str]]]:
    """The stack as the Procfile runs it, JSON logs, a metrics port for every process."""
    own = replace(
        settings, broker_url=servers.redis.url(44), result_backend_url=servers.redis.url(45)
    )
    lanes = {
        "saga": own.saga_queue,
        "default": own.default_queue,
        "batch": own.batch_queue,
        "housekeeping": own.housekeeping_queue,
    }
    ports = {name: free_port() for name in (*lanes, "events", "beat")}
    specs = [
        WorkerSpec(
            f"worker-{name}", queue, concurrency=1, env=(("WORKER_METRICS_PORT", str(ports[name])),)
        )
        for name, queue in lanes.items()
    ]
    stack = Stack(
        own,
        servers.base / "e2e-json-logs",
        extra_env={
            "LOG_FORMAT": "json",
            "EVENTS_METRICS_PORT": str(ports["events"]),
            "BEAT_METRICS_PORT": str(ports["beat"]),
        },
        worker_specs=specs,
        worker_events=True,
        beat=True,
        events=True,
    )
    try:
        stack.start()
        urls = {name: f"http://127.0.0.1:{port}/metrics" for name, port in ports.items()}
        yield stack, {"web": f"{stack.api_url}/metrics", **urls}
    finally:
        stack.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """Every sample of a metrics page, or None while it does not answer 200 text/plain."""
    try:
        answer = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    if answer.status_code != 200 or not answer.headers["content-type"].startswith("text/plain"):
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def test_every_process_answers_prometheus_on_its_port(
    operated: tuple[Stack, dict[str, str]],
) -> None:
    _, urls = operated
    pages = {
        name: wait_for(f"{name}'s metrics", lambda url=url: scrape(url), timeout=30)
        for name, url in urls.items()
    }
    api_type = httpx.get(urls["web"]).headers["content-type"]
    assert api_type.count("charset") == 1, api_type
    for lane in ("saga", "default", "batch", "housekeeping"):
        assert ("orders_outbox_backlog", ()) in pages[lane], lane
    assert any(name == "orders_consumer_lag_events" for name, _ in pages["events"])

    def beat_sent() -> dict | None:
        page = scrape(urls["beat"])
        sent = page and page.get(("orders_beat_sent_total", (("entry", "relay-outbox"),)), 0)
        return page if sent else None

    beat = wait_for("beat to send the relay", beat_sent, timeout=30)
    assert beat[("orders_beat_lock_held", ())] == 1
    assert beat[("orders_beat_last_tick_timestamp_seconds", ())] > time.time() - 60
    assert ("orders_beat_last_sent_timestamp_seconds", (("entry", "relay-outbox"),)) in beat


class TaskEvents:
    """The task events the workers send, captured from the broker in a thread."""

    def __init__(self, stack: Stack) -> None:
        from workers.celery_app import create_celery

        self.app = create_celery(stack.settings, publisher=True)
        self.events: list[dict[str, Any]] = []
        self.receiver: Any = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._capture, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the event receiver never started"

    def _capture(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(
                conn, handlers={"*": self.events.append}, queue_ttl=60
            )
            # Until should_stop (looked at after each event, and every second).
            for _ in self.receiver.itercapture(limit=None, timeout=None, wakeup=False):
                self.ready.set()  # the first event (a heartbeat) came through

    def stop(self) -> list[dict[str, Any]]:
        self.receiver.should_stop = True
        self.thread.join(10)
        self.app.close()
        return [e for e in self.events if e["type"].startswith("task-")]


def test_every_line_is_json_and_housekeeping_stays_out_of_the_log_and_flower(
    operated: tuple[Stack, dict[str, str]], engine: Engine
) -> None:
    stack, urls = operated
    captured = TaskEvents(stack)

    def relays() -> float:
        page = scrape(urls["beat"]) or {}
        return page.get(("orders_beat_sent_total", (("entry", "relay-outbox"),)), 0)

    before = relays()
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    api = stack.client()
    order_id = str(api.place(customer, [(product, 1)]).json()["order_id"])
    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    # The relay ran meanwhile, and more than once (beat sends it every second).
    wait_for("two more relay runs", lambda: relays() >= before + 2, timeout=30)
    # ... and each run is counted where the default lane's worker serves its metrics.
    relay_runs = ("orders_housekeeping_runs_total", (("task", names.RELAY_OUTBOX),))
    ran = wait_for("relay runs counted", lambda: (scrape(urls["default"]) or {}).get(relay_runs))
    assert ran >= 1
    events = captured.stop()
    stack.stop()  # its shutdown lines count too

    received = {e["name"] for e in events if e["type"] == "task-received"}
    assert "saga.order.reserve_stock" in received, received
    assert not received & QUIET_TASKS, received
    for service in stack.services:
        lines = service.log().splitlines()
        assert lines, service.name
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"{service.name}.log line {number} is not JSON: {line[:300]!r}")
            assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(
                record
            ), (service.name, line[:300])
        records = [json.loads(line) for line in lines]
        about_housekeeping = [
            r
            for r in records
            if r["level"] == "INFO" and any(t in r["message"] for t in QUIET_TASKS)
        ]
        assert not about_housekeeping, (service.name, about_housekeeping[:3])

    # The lines are there, as records: the sagas' tasks, gunicorn's own, Celery's.
    def messages(service: str) -> list[str]:
        return [json.loads(line)["message"] for line in stack.service(service).log().splitlines()]

    assert any(
        "saga.order.reserve_stock" in m and "succeeded" in m for m in messages("worker-saga")
    )
    assert any(m.startswith("Starting gunicorn") for m in messages("web"))
    assert any(m.endswith("ready.") for m in messages("worker-default"))
