"""Webhooks through the real system: the API, a saga worker, the event consumers, beat,
and a worker of its own for the webhooks lane (as the Procfile runs them), sending to
real HTTP receivers this test starts on 127.0.0.1.

A receiver that fails its first 3 deliveries gets the order's final state once
accepted, signed with the endpoint's secret (a forged body does not verify), after 4
attempts, all logged. A receiver that never answers holds only the webhooks lane:
orders placed meanwhile still confirm, each within a generous bound; its deliveries die
after WEBHOOK_MAX_ATTEMPTS, become dead letters, and replay once it answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from uuid import UUID

import httpx
import pytest
from sqlalchemy import Engine, select

from config.settings import Settings
from orders import keys, webhooks
from orders.tables import webhook_deliveries
from orders.webhook_deliveries import event_id
from tests.conftest import ADMIN_KEY, Servers
from tests.harness.processes import Stack, WorkerSpec
from tests.harness.receiver import Receiver
from tests.helpers import add_customer, add_product, wait_for
from workers.tables import dead_letters

pytestmark = pytest.mark.e2e

#: Attempts of a delivery here: the flaky receiver's 4th attempt is its last.
MAX_ATTEMPTS = 4
#: A generous bound on one order's confirmation: it proves "not stalled", not a speed.
CONFIRMED_WITHIN = 10.0


@pytest.fixture(scope="module")
def stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    own = replace(
        settings, broker_url=servers.redis.url(46), result_backend_url=servers.redis.url(47)
    )
    stack = Stack(
        own,
        servers.base / "e2e-webhooks",
        beat=True,
        events=True,
        worker_specs=[
            WorkerSpec("worker", "saga.high,default,batch.low,housekeeping", 2),
            WorkerSpec("worker-webhooks", "webhooks", 2),
        ],
        extra_env={
            "WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "WEBHOOK_BACKOFF_SECONDS": "0.2",
            "WEBHOOK_BACKOFF_MAX_SECONDS": "0.5",
            "WEBHOOK_TIMEOUT_SECONDS": "1",
            "WEBHOOK_POLL_SECONDS": "0.5",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client_key(engine: Engine, owner_engine: Engine) -> dict[str, str]:
    """A client key of its own (another test's endpoints hear nothing of its orders)."""
    customer = add_customer(engine, limit="100000.00")
    with owner_engine.begin() as conn:
        key_id, key = keys.create(conn, "webhooks e2e", customer_ids=[customer])
    return {"key": key, "key_id": key_id, "customer": customer}


@pytest.fixture
def http(stack: Stack, client_key: dict[str, str]) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=stack.api_url,
        timeout=10,
        headers={"Authorization": f"Bearer {client_key['key']}"},
    ) as client:
        yield client


def place(http: httpx.Client, customer: str, product: str) -> str:
    body = {"customer_id": customer, "lines": [{"product_id": product, "quantity": 1}]}
    answer = http.post("/orders", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["order_id"])


def status(http: httpx.Client, order_id: str) -> str:
    return str(http.get(f"/orders/{order_id}/status").json()["status"])


def deliveries(http: httpx.Client, endpoint: str) -> list[dict[str, Any]]:
    answer = http.get(f"/webhooks/{endpoint}/deliveries", params={"limit": 100})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["deliveries"])


def test_a_receiver_failing_three_times_gets_the_final_state_once_and_signed(
    stack: Stack, http: httpx.Client, engine: Engine, client_key: dict[str, str]
) -> None:
    product = add_product(engine, on_hand=100)
    with Receiver(fail_first=3) as receiver:
        made = http.post("/webhooks", json={"url": receiver.url})
        assert made.status_code == 201, made.text
        secret, endpoint = made.json()["secret"], made.json()["id"]

        order = place(http, client_key["customer"], product)
        wait_for("the order to confirm", lambda: status(http, order) == "CONFIRMED")
        wait_for("an accepted delivery", receiver.accepted, timeout=30)
        [log] = wait_for(
            "the delivery's log",
            lambda: [d for d in deliveries(http, endpoint) if d["state"] == "DELIVERED"],
        )

    sent = receiver.all()
    assert [r.status for r in sent] == [500, 500, 500, 200]
    # One event, one id on every attempt: the receiver saw it accepted exactly once.
    assert {r.headers["webhook-id"] for r in sent} == {event_id(UUID(order), 2)}
    [accepted] = receiver.accepted()
    assert webhooks.verify(secret, accepted.body, accepted.headers)
    forged = accepted.body.replace(b"CONFIRMED", b"CANCELLED")
    assert forged != accepted.body
    assert not webhooks.verify(secret, forged, accepted.headers)
    assert not webhooks.verify(webhooks.new_secret(), accepted.body, accepted.headers)
    body = json.loads(accepted.body)
    assert (body["type"], body["data"]["order_id"], body["data"]["status"]) == (
        "order.confirmed",
        order,
        "CONFIRMED",
    )
    assert (log["attempts"], log["event_id"]) == (4, event_id(UUID(order), 2))
    assert [a["status_code"] for a in log["attempt_log"]] == [500, 500, 500, 200]
    assert http.delete(f"/webhooks/{endpoint}").status_code == 204


def test_a_receiver_that_never_answers_delays_no_order_and_its_deliveries_replay(
    stack: Stack, http: httpx.Client, engine: Engine, client_key: dict[str, str]
) -> None:
    product = add_product(engine, on_hand=100)
    with Receiver(hang=True) as receiver:
        made = http.post("/webhooks", json={"url": receiver.url})
        assert made.status_code == 201, made.text
        endpoint = made.json()["id"]
        # The first order's delivery holds the receiver's connections from here on.
        first = place(http, client_key["customer"], product)
        wait_for("the silent receiver to be called", receiver.all, timeout=30)

        for _ in range(5):
            placed_at = time.monotonic()
            order = place(http, client_key["customer"], product)
            wait_for(
                "an order to confirm while the receiver hangs",
                lambda order=order: status(http, order) == "CONFIRMED",
                timeout=CONFIRMED_WITHIN,
            )
            assert time.monotonic() - placed_at < CONFIRMED_WITHIN

        dead = wait_for(
            "the first order's delivery to die",
            lambda: [
                d
                for d in deliveries(http, endpoint)
                if d["order_id"] == first and d["state"] == "DEAD"
            ],
            timeout=60,
        )[0]
        assert dead["attempts"] == MAX_ATTEMPTS
        assert all(a["status_code"] is None for a in dead["attempt_log"])
        assert "timed out" in dead["last_error"]
        with engine.connect() as conn:
            letter = conn.execute(
                select(dead_letters.c.id, dead_letters.c.kind, dead_letters.c.state).where(
                    dead_letters.c.task_id == f"webhook:{dead['id']}"
                )
            ).one()
        assert (letter.kind, letter.state) == ("webhook_dead", "OPEN")

        receiver.answer()
        # The operators' replay of its dead letter hands the delivery back.
        replayed = http.post(
            f"/admin/dead-letters/{letter.id}/replay",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert replayed.status_code == 202, replayed.text
        wait_for(
            "the replayed delivery",
            lambda: any(
                r.headers["webhook-id"] == event_id(UUID(first), 2) for r in receiver.accepted()
            ),
            timeout=30,
        )

    with engine.connect() as conn:
        state = conn.execute(
            select(webhook_deliveries.c.state).where(webhook_deliveries.c.id == UUID(dead["id"]))
        ).scalar_one()
    assert state == "DELIVERED"
    assert http.delete(f"/webhooks/{endpoint}").status_code == 204
