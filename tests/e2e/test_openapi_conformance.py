"""The API keeps the contract of its own ``/openapi.json``: schemathesis takes the document
the real server (gunicorn, a saga worker, PostgreSQL, Redis) serves (built here by the
same code, and checked equal to the served one first: schemathesis's loader from a
pytest fixture does not run under pytest 9), and for every operation sends the server
requests valid by it and requests that break it, then checks every
answer: no server error, a status and content type the document lists, a body and
headers that match its schema, valid data accepted (2xx, or 404/409 where the document
says why) and invalid data refused (4xx).

Requests carry real keys (the operator's on the operators' endpoints) and, when valid by
the document, real ids: path parameters name orders, customers, dead letters and batch
runs that exist, an order names a customer and distinct products that exist. Bounded:
MAX_EXAMPLES examples per operation and generation mode."""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import schemathesis
from schemathesis import Case
from sqlalchemy import Connection, Engine, select, update

from config.settings import Settings
from orders import keys, services
from orders.api.openapi import openapi_document
from orders.domain import OrderLine, PlaceOrder
from orders.saga import ORDER_SAGA, OrderSaga
from orders.tables import webhook_deliveries, webhook_endpoints
from sagas import runner
from tests.conftest import ADMIN_KEY, API_KEY
from tests.fakes import RecordingLauncher
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product
from workers import dlq
from workers.tables import dead_letters

pytestmark = pytest.mark.e2e

#: Examples per operation (and generation mode): enough to reach every bound, little time.
MAX_EXAMPLES = 25
#: What a request valid by the document may be answered: done, or a real refusal the
#: document names (an id that names nothing: 404; a letter no longer open: 409). Never a
#: 400/422 (the document promised valid data is taken), nor 401/403 (the keys are real).
ACCEPTED = ["2xx", "404", "409"]
#: Operations anyone may call with anything (no key, no parameters to break).
OPEN = {"GET /healthz", "GET /readyz", "GET /metrics", "GET /openapi.json"}
#: Dead letters the operators' endpoints may replay and purge.
LETTERS = 40
#: Sagas of each kind the operators' saga endpoints may act on.
SAGAS = 8

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "database": "none",
        },
        # The keys, as the document's security schemes name them.
        "auth": {"openapi": {"bearer": {"bearer": API_KEY}, "operator": {"bearer": ADMIN_KEY}}},
        "checks": {
            "positive_data_acceptance": {"expected-statuses": ACCEPTED},
        },
    }
)


@dataclass
class World:
    """What exists on the server, to make valid requests name real things."""

    customers: list[str]
    products: list[str]
    orders: list[str]
    cursors: list[str]
    letters: list[int]
    runs: list[str]
    #: The test key's webhook endpoints: some to delete, the others kept; and dead
    #: deliveries of a kept one, to replay.
    doomed: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)
    deliveries: list[str] = field(default_factory=list)
    _turn: Iterator[int] = field(default_factory=itertools.count)
    #: Sagas for the operators' saga endpoints: running ones (their messages never sent)
    #: to retry and to cancel, and ones whose compensation failed.
    sagas: dict[str, list[str]] = field(default_factory=dict)
    saga_cursors: list[str] = field(default_factory=list)
    #: The statuses each operation answered, by generation mode.
    answers: Counter[tuple[str, str, int]] = field(default_factory=Counter)

    def pick(self, choices: list[Any]) -> Any:
        """The next of ``choices``, in turn."""
        return choices[next(self._turn) % len(choices)]

    def realise(self, case: Case) -> None:
        """Make a case valid by the document also name things that exist."""
        for name, value in (case.path_parameters or {}).items():
            real = {
                "order_id": self.orders,
                "customer_id": self.customers,
                "letter_id": self.letters,
                "run_id": self.runs,
                "webhook_id": (
                    self.doomed if case.operation.method.upper() == "DELETE" else self.webhooks
                ),
                "delivery_id": self.deliveries,
                "saga_id": self.sagas.get(
                    case.operation.path.rsplit("/", 1)[-1], self.sagas.get("any", [])
                ),
            }[name]
            # One in four keeps its drawn id: it names nothing, and must be answered 404.
            if next(self._turn) % 4:
                case.path_parameters[name] = self.pick(real)
            else:
                case.path_parameters[name] = value
        if case.query and "after" in case.query:
            saga_list = case.operation.path == "/admin/sagas"
            case.query["after"] = self.pick(self.saga_cursors if saga_list else self.cursors)
        if case.operation.path == "/orders/status" and case.query:
            drawn = case.query["ids"].split(",")
            case.query["ids"] = ",".join([self.pick(self.orders), *drawn[1:]])
        if case.operation.path == "/orders" and isinstance(case.body, dict):
            case.body["customer_id"] = self.pick(self.customers)
            start = next(self._turn)
            for n, line in enumerate(case.body["lines"]):
                line["product_id"] = self.products[(start + n) % len(self.products)]
            if case.headers and "Idempotency-Key" in case.headers:
                # A drawn key may repeat with another body (refused 422, as documented):
                # keep its characters, make it this order's own.
                drawn = case.headers["Idempotency-Key"]
                case.headers["Idempotency-Key"] = f"{drawn[:200]}-{uuid.uuid4().hex}"
        if case.operation.path.endswith(("/cancel", "/refund")) and "Idempotency-Key" in (
            case.headers or {}
        ):
            # The same for a cancel or a refund: a drawn key may repeat for another order.
            drawn = case.headers["Idempotency-Key"]
            case.headers["Idempotency-Key"] = f"{drawn[:200]}-{uuid.uuid4().hex}"
        if (
            case.operation.path in ("/admin/dead-letters/replay", "/admin/dead-letters/purge")
            and isinstance(case.body, dict)
            and case.body.get("ids")
        ):
            case.body["ids"][0] = self.pick(self.letters)


def _letters(engine: Engine) -> list[int]:
    task = f"tests.conformance.{uuid.uuid4().hex[:8]}"
    for n in range(LETTERS):
        dlq.record(
            engine,
            task_id=f"conformance-{uuid.uuid4()}",
            task_name=task,
            kind=dlq.EXHAUSTED,
            error=f"conformance letter {n}",
            args=[n],
            kwargs={},
            queue="default",
            traceback="Traceback (most recent call last): ...",
        )
    with engine.connect() as conn:
        rows = conn.execute(select(dead_letters.c.id).where(dead_letters.c.task_name == task))
        return [row.id for row in rows]


class _FailingRelease(OrderSaga):
    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        raise RuntimeError("conformance: the store is down")


def _sagas(engine: Engine, customer: str, product: str) -> dict[str, list[str]]:
    """Sagas recorded but never sent: to retry, to cancel, and (both steps run, the
    compensation failed) to retry the compensation of."""
    made: dict[str, list[str]] = {"retry": [], "cancel": [], "retry-compensation": []}
    for kind, ids in made.items():
        for _ in range(SAGAS):
            launcher = RecordingLauncher()
            services.place_order(
                engine, PlaceOrder(customer, (OrderLine(product, 1),), client="tests"), launcher
            )
            (start,) = launcher.launched
            if kind == "retry-compensation":
                for step in ORDER_SAGA.step_names:
                    runner.run_step(engine, OrderSaga(), start.saga_id, step, start.payload)
                runner.cancel(
                    engine,
                    _FailingRelease(),
                    start.saga_id,
                    "operator_cancelled",
                    retry_after=lambda n: None,
                )
            ids.append(str(start.saga_id))
    made["any"] = [*made["retry"], *made["cancel"], *made["retry-compensation"]]
    return made


def _webhooks(world: World, client: httpx.Client, engine: Engine) -> None:
    """Endpoints of the test key (kept, and to delete) and dead deliveries to replay."""
    for n in range(6):
        made = client.post("/webhooks", json={"url": f"http://127.0.0.1:9/hook-{n}"})
        assert made.status_code == 201, made.text
        (world.doomed if n % 2 else world.webhooks).append(made.json()["id"])
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "endpoint_id": uuid.UUID(world.webhooks[0]),
            "event_id": f"evt_conformance_{n}",
            "order_id": uuid.uuid4(),
            "event_type": "order.confirmed",
            "payload": {},
            "state": "DEAD",
            "attempts": 8,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for n in range(LETTERS)
    ]
    with engine.begin() as conn:
        conn.execute(webhook_deliveries.insert().values(rows))
    world.deliveries += [str(row["id"]) for row in rows]


@pytest.fixture(scope="module")
def world(stack: Stack, settings: Settings, engine: Engine) -> Iterator[World]:
    customers = [add_customer(engine, limit="1000000000.00") for _ in range(3)]
    products = [add_product(engine, on_hand=10**9) for _ in range(settings.max_order_lines)]
    client = stack.client()
    orders = []
    for n, customer in enumerate(customers * 2):
        placed = client.place(customer, [(products[n], 1 + n)])
        assert placed.status_code == 202, placed.text
        orders.append(placed.json()["order_id"])
    client.wait_until_final(orders[-1])  # one order with a whole timeline
    cursors = []
    for customer in customers:
        page = client.http.get(f"/customers/{customer}/orders", params={"limit": 1}).json()
        cursors += parse_qs(urlsplit(page["next"]).query)["after"]
    operator = {"Authorization": f"Bearer {ADMIN_KEY}"}
    started = httpx.post(f"{stack.api_url}/admin/batches/credit-check", headers=operator)
    assert started.status_code == 202, started.text
    world = World(
        customers, products, orders, cursors, _letters(engine), [started.json()["run_id"]]
    )
    _webhooks(world, client.http, engine)
    world.sagas = _sagas(engine, customers[0], products[0])
    page = httpx.get(f"{stack.api_url}/admin/sagas", params={"limit": 1}, headers=operator)
    world.saga_cursors += parse_qs(urlsplit(page.json()["next"]).query)["after"]
    yield world
    # The endpoints the run made send nothing to later tests' orders.
    with engine.begin() as conn:
        conn.execute(
            update(webhook_endpoints)
            .where(webhook_endpoints.c.key_id == keys.key_id_of(API_KEY))
            .values(disabled_at=datetime.now(UTC))
        )


#: The document the tests are drawn from: the one the server builds (the run checks that
#: it serves this very document first).
DOCUMENT = openapi_document(Settings(env="test"))
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


def test_the_server_serves_the_document_the_run_is_drawn_from(stack: Stack) -> None:
    served = httpx.get(f"{stack.api_url}/openapi.json")
    assert served.status_code == 200
    assert served.headers["Content-Type"] == "application/json"
    assert served.json() == json.loads(json.dumps(DOCUMENT))


@schema.parametrize()
def test_the_api_keeps_the_contract_of_its_openapi_document(
    case: Case, stack: Stack, world: World
) -> None:
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive:
        world.realise(case)
    response = case.call_and_validate(base_url=stack.api_url, timeout=10)
    world.answers[
        case.operation.label, "valid" if positive else "invalid", response.status_code
    ] += 1


def test_every_operation_was_answered_with_success_and_with_refusal(world: World) -> None:
    """The run above reached every operation's success (real ids, real keys) and its
    refusals: not a run of 401s or 404s."""
    print()
    for (operation, kind, status), count in sorted(world.answers.items()):
        print(f"{operation:45} {kind:8} {status} x{count}")
    operations = {operation for operation, _, _ in world.answers}
    assert len(operations) == len(list(schema.get_all_operations()))
    for operation in operations:
        statuses = {status for (op, _, status) in world.answers if op == operation}
        assert any(200 <= status < 300 for status in statuses), (operation, statuses)
        if operation not in OPEN:
            assert statuses & {400, 401, 404, 415, 422}, (operation, statuses)
