"""Cancel and refund through the real processes: a cancel racing the saga's own decision
ends either cancelled with everything released or refunded with everything returned; a
refund returns stock and credit; the answers keep the API's rules (409, 404, keys)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from config.settings import Settings
from orders import keys
from orders.tables import order_events, orders
from tests.conftest import Servers
from tests.harness.checker import require, settle, world_of
from tests.harness.processes import Stack
from tests.helpers import Stock, add_customer, add_product, credit_of, stock_of, wait_for

pytestmark = pytest.mark.e2e

#: Each step waits this long before it runs: a cancel sent a random moment after the
#: order lands before, during or after the saga's decision.
STEP_DELAY = 0.05
RACES = 50

CANCELLED_EVENTS = ["OrderPlaced", "OrderCancelRequested", "OrderCancelled"]
REFUNDED_BY_CANCEL = [
    "OrderPlaced",
    "OrderConfirmed",
    "OrderCancelRequested",
    "OrderRefundRequested",
    "OrderRefunded",
]


@pytest.fixture(scope="module")
def stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    """The API, a worker whose steps take a little time, and the event consumers."""
    own = replace(
        settings, broker_url=servers.redis.url(62), result_backend_url=servers.redis.url(63)
    )
    stack = Stack(
        own,
        servers.base / "e2e-cancel",
        extra_env={"SAGA_STEP_DELAY_SECONDS": str(STEP_DELAY)},
        events=True,
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def http(stack: Stack) -> httpx.Client:
    return stack.client().http


def place(http: httpx.Client, customer: str, product: str, quantity: int = 2) -> str:
    body = {"customer_id": customer, "lines": [{"product_id": product, "quantity": quantity}]}
    response = http.post("/orders", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["order_id"])


def status_of(http: httpx.Client, order_id: str) -> dict[str, Any]:
    response = http.get(f"/orders/{order_id}/status")
    response.raise_for_status()
    return dict(response.json())


def wait_status(http: httpx.Client, order_id: str, *wanted: str) -> dict[str, Any]:
    return wait_for(
        f"order {order_id} to be {wanted}",
        lambda: (s := status_of(http, order_id))["status"] in wanted and s,
        timeout=30,
    )


def events_of(engine: Engine, order_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(order_events.c.type)
                .where(order_events.c.order_id == order_id)
                .order_by(order_events.c.seq)
            ).scalars()
        )


def version_of(engine: Engine, order_id: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(orders.c.version).where(orders.c.id == order_id)).one()[0])


def test_a_cancel_racing_the_saga_ends_cancelled_or_refunded_with_everything_back(
    http: httpx.Client, engine: Engine
) -> None:
    customer = add_customer(engine, limit="100000.00")
    product = add_product(engine, on_hand=1000, price="10.00")
    # How long a saga takes here, now: the cancels are spread over twice that, so that
    # some land before the steps commit, some between, some after the decision.
    began = time.monotonic()
    wait_status(http, place(http, customer, product), "CONFIRMED")
    took = time.monotonic() - began
    rng = random.Random()
    waits = [rng.uniform(0.0, 2 * took) for _ in range(RACES)]

    def race(wait: float) -> tuple[str, dict[str, Any]]:
        order_id = place(http, customer, product)
        time.sleep(wait)  # the race's jitter: when the cancel lands, on purpose
        answer = http.post(f"/orders/{order_id}/cancel")
        assert answer.status_code == 202, answer.text
        return order_id, dict(answer.json())

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(race, waits))

    outcomes = {answer["outcome"] for _, answer in results}
    for order_id, answer in results:
        if answer["outcome"] == "cancelled":
            final = status_of(http, order_id)  # decided in the request
            assert (final["status"], final["cancel_reason"]) == ("CANCELLED", "customer_cancelled")
            assert events_of(engine, order_id) == CANCELLED_EVENTS
        else:
            assert answer["outcome"] == "refund" and answer["refund_saga_id"]
            wait_status(http, order_id, "REFUNDED")
            assert events_of(engine, order_id) == REFUNDED_BY_CANCEL
    assert outcomes == {"cancelled", "refund"}, f"one outcome only: {outcomes} ({took:.2f} s)"
    # The calibration order is still confirmed: it holds its units and its amount.
    assert stock_of(engine, product) == Stock(on_hand=998, reserved=0)
    credit = credit_of(engine, customer)
    assert (credit.used, credit.reserved) == (Decimal("20.00"), Decimal(0))
    require(settle(engine, world_of([customer], {product: 1000})))


def test_a_refund_returns_stock_and_credit_once_and_shows_in_the_timeline_and_summary(
    http: httpx.Client, engine: Engine
) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=5, price="10.00")
    order_id = place(http, customer, product, quantity=3)
    wait_status(http, order_id, "CONFIRMED")
    assert stock_of(engine, product).on_hand == 2
    assert credit_of(engine, customer).used == Decimal("30.00")

    first = http.post(f"/orders/{order_id}/refund", headers={"Idempotency-Key": "refund-1"})
    assert first.status_code == 202, first.text
    assert first.headers["Location"] == f"/orders/{order_id}/status"
    again = http.post(f"/orders/{order_id}/refund", headers={"Idempotency-Key": "refund-1"})
    unkeyed = http.post(f"/orders/{order_id}/refund")
    assert again.json() == first.json()
    assert unkeyed.status_code == 202
    assert unkeyed.json()["refund_saga_id"] == first.json()["refund_saga_id"]

    wait_status(http, order_id, "REFUNDED")
    assert stock_of(engine, product).on_hand == 5
    assert credit_of(engine, customer).used == Decimal(0)
    assert events_of(engine, order_id)[-2:] == ["OrderRefundRequested", "OrderRefunded"]
    # A cancel of a refunded order answers its refund; nothing changes.
    version = version_of(engine, order_id)
    cancel = http.post(f"/orders/{order_id}/cancel")
    assert cancel.status_code == 202
    assert cancel.json()["refund_saga_id"] == first.json()["refund_saga_id"]
    assert version_of(engine, order_id) == version

    timeline = http.get(f"/orders/{order_id}/timeline").json()
    assert timeline["state"] == "CONFIRMED"
    refund = timeline["refund"]
    assert (refund["saga_id"], refund["state"]) == (first.json()["refund_saga_id"], "CONFIRMED")
    assert sorted((s["step"], s["outcome"]) for s in refund["steps"]) == [
        ("return_credit", "APPLIED"),
        ("return_stock", "APPLIED"),
    ]
    summary = wait_for(
        "the summary to count the refund",
        lambda: (s := http.get(f"/customers/{customer}/summary").json())["orders_refunded"] and s,
    )
    assert (summary["orders_confirmed"], summary["refunded_total"]) == (1, "30.00")
    require(settle(engine, world_of([customer], {product: 5})))


def test_a_cancelled_order_answers_409_and_nothing_changes(
    http: httpx.Client, engine: Engine
) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=0)
    order_id = place(http, customer, product)
    assert wait_status(http, order_id, "CANCELLED")["cancel_reason"] == "out_of_stock"
    version = version_of(engine, order_id)

    for action in ("cancel", "refund"):
        answer = http.post(f"/orders/{order_id}/{action}", headers={"Idempotency-Key": action})
        assert answer.status_code == 409, answer.text
        assert answer.headers["Content-Type"] == "application/problem+json"
    assert version_of(engine, order_id) == version
    assert status_of(http, order_id)["cancel_reason"] == "out_of_stock"


def test_a_repeated_cancel_gets_the_same_answer_and_a_reused_key_is_refused(
    http: httpx.Client, engine: Engine
) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=5)
    order_id = place(http, customer, product)
    other = place(http, customer, product)

    first = http.post(f"/orders/{order_id}/cancel", headers={"Idempotency-Key": "cancel-k"})
    assert first.status_code == 202, first.text
    again = http.post(f"/orders/{order_id}/cancel", headers={"Idempotency-Key": "cancel-k"})
    assert (again.status_code, again.json()) == (202, first.json())
    reused = http.post(f"/orders/{other}/cancel", headers={"Idempotency-Key": "cancel-k"})
    assert reused.status_code == 422
    assert reused.headers["Content-Type"] == "application/problem+json"
    wait_status(http, other, "CONFIRMED")  # the reused key changed nothing
    wait_status(http, order_id, "CANCELLED", "REFUNDED")
    require(settle(engine, world_of([customer], {product: 5})))


def test_an_order_outside_the_keys_customers_is_not_found(
    stack: Stack, http: httpx.Client, engine: Engine, owner_engine: Engine
) -> None:
    customer = add_customer(engine, limit="100.00")
    elsewhere = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=5)
    order_id = place(http, customer, product)
    wait_status(http, order_id, "CONFIRMED")
    with owner_engine.begin() as conn:
        _, key = keys.create(conn, "tests: another customer", customer_ids=[elsewhere])
    version = version_of(engine, order_id)

    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=10
    ) as outsider:
        for action in ("cancel", "refund"):
            answer = outsider.post(f"/orders/{order_id}/{action}")
            assert answer.status_code == 404, answer.text
            assert answer.headers["Content-Type"] == "application/problem+json"
    assert version_of(engine, order_id) == version
    assert status_of(http, order_id)["status"] == "CONFIRMED"
