"""Orders through the real system: HTTP to gunicorn, a chord on a prefork Celery worker,
PostgreSQL and Redis. Each order ends CONFIRMED or CANCELLED with exact stock and credit,
whether the saga's steps are joined by a chord or in the database (SAGA_JOIN)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from decimal import Decimal
from uuid import UUID

import httpx
import pytest
from celery import Celery
from redis import Redis
from sqlalchemy import Engine, func, select

from config import names
from config.settings import Settings
from orders.tables import order_events, orders, products
from sagas.canvas import complete_task_id, step_task_id
from sagas.tables import saga_steps, sagas
from tests.conftest import Servers
from tests.harness.client import Api
from tests.harness.processes import Stack
from tests.helpers import Credit, Stock, add_customer, add_product, credit_of, row_counts, stock_of
from workers.celery_app import create_celery

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def database_join_stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    """The same system with SAGA_JOIN=database: steps sent alone, the last one to
    finish completes the saga."""
    own = replace(
        settings, broker_url=servers.redis.url(54), result_backend_url=servers.redis.url(55)
    )
    stack = Stack(own, servers.base / "e2e-database-join", extra_env={"SAGA_JOIN": "database"})
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(params=["chord", "database"])
def api(request: pytest.FixtureRequest, stack: Stack) -> Api:
    """Every test here runs on both ways of joining a saga's steps."""
    if request.param == "chord":
        return stack.client()
    joined: Stack = request.getfixturevalue("database_join_stack")
    return joined.client()


def saga_of(engine: Engine, order_id: str) -> UUID:
    with engine.connect() as conn:
        return conn.execute(
            select(orders.c.saga_id).where(orders.c.id == UUID(order_id))
        ).scalar_one()


def ledger(engine: Engine, saga_id: UUID) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(saga_steps.c.step, saga_steps.c.status, saga_steps.c.reason).where(
                saga_steps.c.saga_id == saga_id
            )
        ).all()
    return {row.step: (row.status, row.reason) for row in rows}


def events(engine: Engine, order_id: str) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                select(order_events.c.seq, order_events.c.type)
                .where(order_events.c.order_id == UUID(order_id))
                .order_by(order_events.c.seq)
            )
        ]


def test_an_order_within_stock_and_credit_is_confirmed_with_exact_figures(
    api: Api, engine: Engine
) -> None:
    customer = add_customer(engine, limit="1000.00")
    paper, toner = (
        add_product(engine, on_hand=10, price="12.50"),
        add_product(engine, on_hand=3, price="99.99"),
    )
    response = api.place(customer, [(paper, 4), (toner, 3)])
    assert response.status_code == 202
    order_id = response.json()["order_id"]
    assert response.headers["Location"] == f"/orders/{order_id}/status"

    final = api.wait_until_final(order_id)
    assert (final["status"], final["cancel_reason"]) == ("CONFIRMED", None)
    assert stock_of(engine, paper) == Stock(on_hand=6, reserved=0)
    assert stock_of(engine, toner) == Stock(on_hand=0, reserved=0)
    assert credit_of(engine, customer) == Credit(
        Decimal("1000.00"), Decimal("349.97"), Decimal("0")
    )
    order = api.order(order_id)
    assert (order["status"], order["total"]) == ("CONFIRMED", "349.97")
    assert events(engine, order_id) == [(1, "OrderPlaced"), (2, "OrderConfirmed")]
    assert ledger(engine, saga_of(engine, order_id)) == {
        "reserve_stock": ("APPLIED", None),
        "reserve_credit": ("APPLIED", None),
    }


def test_out_of_stock_is_cancelled_with_its_reason_and_the_credit_released(
    api: Api, engine: Engine
) -> None:
    customer = add_customer(engine, limit="1000.00")
    product = add_product(engine, on_hand=2)
    order_id = api.place(customer, [(product, 3)]).json()["order_id"]

    final = api.wait_until_final(order_id)
    assert (final["status"], final["cancel_reason"]) == ("CANCELLED", "out_of_stock")
    assert credit_of(engine, customer) == Credit(Decimal("1000.00"), Decimal("0"), Decimal("0"))
    assert stock_of(engine, product) == Stock(on_hand=2, reserved=0)
    assert ledger(engine, saga_of(engine, order_id)) == {
        "reserve_stock": ("REFUSED", "out_of_stock"),
        "reserve_credit": ("COMPENSATED", None),
    }


def test_over_the_credit_limit_is_cancelled_with_its_reason_and_the_stock_released(
    api: Api, engine: Engine
) -> None:
    customer = add_customer(engine, limit="15.00")
    product = add_product(engine, on_hand=5, price="10.00")
    order_id = api.place(customer, [(product, 2)]).json()["order_id"]

    final = api.wait_until_final(order_id)
    assert (final["status"], final["cancel_reason"]) == ("CANCELLED", "credit_limit_exceeded")
    assert stock_of(engine, product) == Stock(on_hand=5, reserved=0)
    assert credit_of(engine, customer).reserved == Decimal("0")
    assert api.order(order_id)["cancel_reason"] == "credit_limit_exceeded"


class StockSampler:
    """Samples a product's figures while orders race, to catch a transient negative."""

    def __init__(self, engine: Engine, product: str) -> None:
        self.engine, self.product = engine, product
        self.lowest_available: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = select(products.c.on_hand - products.c.reserved, products.c.reserved).where(
            products.c.id == self.product
        )
        with self.engine.connect() as conn:
            while not self._stop.is_set():
                available, reserved = conn.execute(query).one()
                conn.rollback()
                low = min(available, reserved)
                self.lowest_available = (
                    low if self.lowest_available is None else min(self.lowest_available, low)
                )
                self.samples += 1
                self._stop.wait(0.005)

    def __enter__(self) -> StockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def race(api: Api, customer_for: list[str], product: str, quantity: int) -> list[str]:
    def place(customer: str) -> str:
        response = api.place(customer, [(product, quantity)])
        assert response.status_code == 202, response.text
        return str(response.json()["order_id"])

    with ThreadPoolExecutor(max_workers=20) as pool:
        order_ids = list(pool.map(place, customer_for))
        finals = list(pool.map(api.wait_until_final, order_ids))
    return [f"{f['status']}:{f['cancel_reason']}" for f in finals]


def test_twenty_orders_racing_for_five_units_confirm_exactly_five(api: Api, engine: Engine) -> None:
    product = add_product(engine, on_hand=5, price="1.00")
    customers = [add_customer(engine, limit="100.00") for _ in range(20)]
    with StockSampler(engine, product) as sampler:
        outcomes = Counter(race(api, customers, product, 1))

    assert outcomes == {"CONFIRMED:None": 5, "CANCELLED:out_of_stock": 15}
    assert stock_of(engine, product) == Stock(on_hand=0, reserved=0)
    assert sampler.samples > 0 and sampler.lowest_available is not None
    assert sampler.lowest_available >= 0
    credits = [credit_of(engine, c) for c in customers]
    assert sorted(c.used for c in credits) == [Decimal("0")] * 15 + [Decimal("1.00")] * 5
    assert all(c.reserved == 0 for c in credits)


def test_twenty_orders_racing_for_one_credit_limit_confirm_exactly_what_fits(
    api: Api, engine: Engine
) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=1000, price="20.00")
    outcomes = Counter(race(api, [customer] * 20, product, 1))

    assert outcomes == {"CONFIRMED:None": 5, "CANCELLED:credit_limit_exceeded": 15}
    assert credit_of(engine, customer) == Credit(Decimal("100.00"), Decimal("100.00"), Decimal("0"))
    assert stock_of(engine, product) == Stock(on_hand=995, reserved=0)


@pytest.fixture(scope="module")
def publisher(settings: Settings) -> Iterator[Celery]:
    app = create_celery(settings)
    yield app
    app.close()


def test_redelivering_each_step_and_the_completion_changes_nothing(
    api: Api, engine: Engine, publisher: Celery
) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=1, price="30.00")
    confirmed = api.place(customer, [(product, 1)]).json()["order_id"]
    cancelled = api.place(customer, [(product, 1)]).json()["order_id"]  # no stock left
    assert api.wait_until_final(confirmed)["status"] == "CONFIRMED"
    assert api.wait_until_final(cancelled)["status"] == "CANCELLED"
    before = (
        stock_of(engine, product),
        credit_of(engine, customer),
        [ledger(engine, saga_of(engine, o)) for o in (confirmed, cancelled)],
        [events(engine, o) for o in (confirmed, cancelled)],
    )

    for order_id in (confirmed, cancelled):
        saga_id = saga_of(engine, order_id)
        with engine.connect() as conn:
            payload = conn.execute(
                select(sagas.c.payload).where(sagas.c.id == saga_id)
            ).scalar_one()
        # The same messages again, as a redelivery brings them (same task ids); their
        # results are stored this time so the test can wait for them.
        sent = [
            publisher.send_task(
                task,
                args=(str(saga_id), payload),
                queue=names.SAGA_QUEUE,
                task_id=step_task_id(saga_id, step),
                ignore_result=False,
            )
            for step, task in (
                ("reserve_stock", names.RESERVE_STOCK),
                ("reserve_credit", names.RESERVE_CREDIT),
            )
        ]
        outcomes = [result.get(timeout=30) for result in sent]
        recorded = ledger(engine, saga_id)
        assert [(o["status"], o["reason"]) for o in outcomes] == [
            recorded["reserve_stock"],
            recorded["reserve_credit"],
        ]
        completion = publisher.send_task(
            names.COMPLETE_ORDER,
            args=(outcomes, str(saga_id)),
            queue=names.SAGA_QUEUE,
            task_id=complete_task_id(saga_id),
            ignore_result=False,
        )
        completion.get(timeout=30)

    after = (
        stock_of(engine, product),
        credit_of(engine, customer),
        [ledger(engine, saga_of(engine, o)) for o in (confirmed, cancelled)],
        [events(engine, o) for o in (confirmed, cancelled)],
    )
    assert after == before


def test_a_retried_post_returns_the_same_order(api: Api, engine: Engine) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=5)
    key = {"Idempotency-Key": f"e2e-retry-{customer}"}
    first = api.place(customer, [(product, 1)], **key)
    second = api.place(customer, [(product, 1)], **key)
    assert first.status_code == second.status_code == 202
    assert first.json()["order_id"] == second.json()["order_id"]
    api.wait_until_final(first.json()["order_id"])
    with engine.connect() as conn:
        count = conn.execute(
            select(func.count()).select_from(orders).where(orders.c.customer_id == customer)
        ).scalar_one()
    assert count == 1
    assert stock_of(engine, product) == Stock(on_hand=4, reserved=0)


def test_the_real_server_refuses_bad_requests_and_writes_nothing(api: Api, engine: Engine) -> None:
    before = row_counts(engine)

    def chunks() -> Iterator[bytes]:
        yield b'{"customer_id": "'
        for _ in range(100):
            yield b"x" * 1024  # 100 KiB with no Content-Length: past the 64 KiB limit
        yield b'"}'

    too_large = api.http.post(
        "/orders", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert too_large.status_code == 413
    malformed = api.http.post("/orders", content=b"{", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400
    unknown = api.place("NOBODY", [("NOTHING", 1)])
    assert unknown.status_code == 422
    assert {e["loc"] for e in unknown.json()["errors"]} == {"customer_id", "lines.0.product_id"}
    anonymous = httpx.post(api.http.base_url.join("/orders"), json={})
    assert anonymous.status_code == 401
    for response in (too_large, malformed, unknown, anonymous):
        assert response.headers["content-type"] == "application/problem+json"
    assert row_counts(engine) == before


def test_the_database_join_completes_sagas_without_chord_state(
    database_join_stack: Stack, engine: Engine
) -> None:
    """With SAGA_JOIN=database no chord is sent: the result backend holds no join keys
    and no completion task runs; the step that finishes last completes the saga."""
    api = database_join_stack.client()
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=1, price="30.00")
    confirmed = api.place(customer, [(product, 1)]).json()["order_id"]
    cancelled = api.place(customer, [(product, 1)]).json()["order_id"]
    assert api.wait_until_final(confirmed)["status"] == "CONFIRMED"
    assert api.wait_until_final(cancelled)["cancel_reason"] == "out_of_stock"
    assert stock_of(engine, product) == Stock(on_hand=0, reserved=0)
    assert credit_of(engine, customer) == Credit(Decimal("100.00"), Decimal("30.00"), Decimal("0"))
    backend = Redis.from_url(database_join_stack.settings.result_backend_url)
    assert not [key for key in backend.scan_iter() if b"taskset" in key or b"chord" in key]
    backend.close()
    log = database_join_stack.logs(tail=10**7)
    assert f"{names.COMPLETE_ORDER}[" not in log  # "Task <name>[<id>] received"
    assert f"{names.RESERVE_STOCK}[" in log
