"""The HTTP API on a real database: accepted orders are written whole, bad input is refused
with a problem document and writes nothing, retries with an Idempotency-Key are safe."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any
from uuid import UUID

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select

from config.settings import Settings
from orders.api import create_app
from orders.tables import order_events, order_lines, orders
from sagas.tables import outbox, sagas
from tests.conftest import API_KEY
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product, row_counts

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def launcher() -> RecordingLauncher:
    return RecordingLauncher()


@pytest.fixture
def app(settings: Settings, engine: Engine, launcher: RecordingLauncher) -> Flask:
    return create_app(
        replace(settings, max_order_lines=5, max_line_quantity=1000),
        starter=launcher,
        engine=engine,
    )


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as client:
        yield client


@pytest.fixture
def refs(engine: Engine) -> dict[str, str]:
    return {
        "customer": add_customer(engine, limit="1000.00"),
        "product": add_product(engine, on_hand=10, price="2.50"),
        "other": add_product(engine, on_hand=10, price="1.25"),
        "pricey": add_product(engine, on_hand=10, price="9999999999.99"),
    }


def post(client: FlaskClient, body: Any, **headers: str):
    return client.post(
        "/orders",
        data=json.dumps(body),
        content_type="application/json",
        headers={**AUTH, **headers},
    )


def test_accepts_an_order_and_writes_it_whole_in_one_transaction(
    client: FlaskClient, engine: Engine, launcher: RecordingLauncher, refs: dict[str, str]
) -> None:
    body = {
        "customer_id": refs["customer"],
        "lines": [
            {"product_id": refs["product"], "quantity": 3},
            {"product_id": refs["other"], "quantity": 2},
        ],
    }
    response = post(client, body)

    assert response.status_code == 202
    order_id = UUID(response.json["order_id"])
    assert response.headers["Location"] == f"/orders/{order_id}/status"
    assert response.json["status"] == "PENDING"
    with engine.connect() as conn:
        order = conn.execute(select(orders).where(orders.c.id == order_id)).one()
        lines = conn.execute(
            select(order_lines.c.product_id, order_lines.c.quantity)
            .where(order_lines.c.order_id == order_id)
            .order_by(order_lines.c.line_no)
        ).all()
        events = conn.execute(
            select(order_events.c.seq, order_events.c.type).where(
                order_events.c.order_id == order_id
            )
        ).all()
        saga = conn.execute(select(sagas).where(sagas.c.id == order.saga_id)).one()
        queued = conn.execute(
            select(outbox.c.saga_id).where(outbox.c.saga_id == order.saga_id)
        ).all()
    assert (order.status, str(order.total)) == ("PENDING", "10.00")
    assert [tuple(line) for line in lines] == [(refs["product"], 3), (refs["other"], 2)]
    assert [tuple(e) for e in events] == [(1, "OrderPlaced")]
    assert (saga.state, saga.payload["amount"]) == ("RUNNING", "10.00")
    assert saga.payload["lines"] == [[refs["product"], 3], [refs["other"], 2]]
    assert len(queued) == 1  # the outbox entry: the recording launcher did not clear it
    assert [s.order_id for s in launcher.launched] == [order_id]


def test_reads_back_the_order_and_its_status(client: FlaskClient, refs: dict[str, str]) -> None:
    order_id = post(
        client,
        {
            "customer_id": refs["customer"],
            "lines": [{"product_id": refs["product"], "quantity": 2}],
        },
    ).json["order_id"]

    order = client.get(f"/orders/{order_id}", headers=AUTH)
    assert order.status_code == 200
    assert order.json["customer_id"] == refs["customer"]
    assert order.json["total"] == "5.00"
    assert order.json["lines"] == [
        {"product_id": refs["product"], "quantity": 2, "unit_price": "2.50"}
    ]
    status = client.get(f"/orders/{order_id}/status", headers=AUTH)
    assert status.status_code == 200
    assert (status.json["status"], status.json["cancel_reason"]) == ("PENDING", None)


@pytest.mark.parametrize(
    "path",
    [
        "/orders/00000000-0000-0000-0000-000000000000",
        "/orders/00000000-0000-0000-0000-000000000000/status",
        "/orders/not-a-uuid",
        "/orders/*/status",
    ],
)
def test_an_unknown_order_is_404(client: FlaskClient, path: str) -> None:
    response = client.get(path, headers=AUTH)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"


def test_a_retried_post_with_the_same_key_returns_the_same_order(
    client: FlaskClient, engine: Engine, launcher: RecordingLauncher, refs: dict[str, str]
) -> None:
    body = {
        "customer_id": refs["customer"],
        "lines": [{"product_id": refs["product"], "quantity": 1}],
    }
    before = row_counts(engine)
    first = post(client, body, **{"Idempotency-Key": "retry-1"})
    second = post(client, body, **{"Idempotency-Key": '"retry-1"'})  # sf-string form

    assert first.status_code == second.status_code == 202
    assert first.json["order_id"] == second.json["order_id"]
    assert second.headers["Location"] == first.headers["Location"]
    assert row_counts(engine)["orders"] == before["orders"] + 1
    assert len(launcher.launched) == 1


def test_the_same_key_with_another_body_is_refused(
    client: FlaskClient, engine: Engine, refs: dict[str, str]
) -> None:
    body = {
        "customer_id": refs["customer"],
        "lines": [{"product_id": refs["product"], "quantity": 1}],
    }
    assert post(client, body, **{"Idempotency-Key": "k-2"}).status_code == 202
    before = row_counts(engine)
    body["lines"][0]["quantity"] = 2
    response = post(client, body, **{"Idempotency-Key": "k-2"})
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    assert "Idempotency-Key" in response.json["title"]
    assert row_counts(engine) == before


def test_concurrent_retries_with_one_key_make_one_order(
    app: Flask, engine: Engine, refs: dict[str, str]
) -> None:
    body = {
        "customer_id": refs["customer"],
        "lines": [{"product_id": refs["product"], "quantity": 1}],
    }
    before = row_counts(engine)

    def send(_: int) -> str:
        with app.test_client() as client:
            response = post(client, body, **{"Idempotency-Key": "race-3"})
            assert response.status_code == 202
            return str(response.json["order_id"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(send, range(8)))
    assert len(ids) == 1
    assert row_counts(engine)["orders"] == before["orders"] + 1


def bad_bodies(refs: dict[str, str]) -> list[tuple[str, Any, int, str]]:
    """(case, body, status, words the problem must contain)."""
    c, p = refs["customer"], refs["product"]

    def order(**line: Any) -> dict[str, Any]:
        return {"customer_id": c, "lines": [{"product_id": p, "quantity": 1, **line}]}

    return [
        (
            "unknown customer",
            {"customer_id": "NOBODY", "lines": [{"product_id": p, "quantity": 1}]},
            422,
            "unknown customer",
        ),
        ("unknown product", order(product_id="NO-SUCH-SKU"), 422, "unknown product"),
        ("zero quantity", order(quantity=0), 422, "lines.0.quantity"),
        ("negative quantity", order(quantity=-1), 422, "lines.0.quantity"),
        ("boolean quantity", order(quantity=True), 422, "lines.0.quantity"),
        ("fractional quantity", order(quantity=1.5), 422, "lines.0.quantity"),
        ("quantity as text", order(quantity="1"), 422, "lines.0.quantity"),
        ("huge quantity", order(quantity=2**63), 422, "lines.0.quantity"),
        (
            "customer as number",
            {"customer_id": 7, "lines": [{"product_id": p, "quantity": 1}]},
            422,
            "customer_id",
        ),
        (
            "NUL in an id",
            {"customer_id": "A\x00B", "lines": [{"product_id": p, "quantity": 1}]},
            422,
            "customer_id",
        ),
        (
            "SQL in an id",
            {
                "customer_id": "x'; DROP TABLE orders;--",
                "lines": [{"product_id": p, "quantity": 1}],
            },
            422,
            "customer_id",
        ),
        ("no lines", {"customer_id": c, "lines": []}, 422, "lines"),
        ("lines missing", {"customer_id": c}, 422, "lines"),
        (
            "too many lines",
            {"customer_id": c, "lines": [{"product_id": f"P{n}", "quantity": 1} for n in range(6)]},
            422,
            "at most 5 lines",
        ),
        (
            "a product twice",
            {
                "customer_id": c,
                "lines": [{"product_id": p, "quantity": 1}, {"product_id": p, "quantity": 2}],
            },
            422,
            "product listed twice",
        ),
        ("unknown field", {**order(), "discount": "100%"}, 422, "discount"),
        (
            "a total no account can hold",
            {"customer_id": c, "lines": [{"product_id": refs["pricey"], "quantity": 1000}]},
            422,
            "exceeds 999999999999.99",
        ),
        ("not an object", [order()], 422, "Invalid order"),
    ]


def test_bad_orders_get_a_problem_document_and_write_nothing(
    client: FlaskClient, engine: Engine, launcher: RecordingLauncher, refs: dict[str, str]
) -> None:
    before = row_counts(engine)
    for case, body, status, words in bad_bodies(refs):
        response = post(client, body)
        assert response.status_code == status, case
        assert response.mimetype == "application/problem+json", case
        assert response.json["status"] == status, case
        assert words in json.dumps(response.json), (case, response.json)
    assert row_counts(engine) == before
    assert launcher.launched == []


@pytest.mark.parametrize(
    ("case", "data", "content_type", "headers", "status"),
    [
        ("malformed JSON", b'{"customer_id": ', "application/json", {}, 400),
        ("deeply nested JSON", b"[" * 20_000 + b"]" * 20_000, "application/json", {}, 400),
        ("invalid UTF-8", b'{"customer_id": "\xff"}', "application/json", {}, 400),
        ("not JSON at all", b"customer=ACME", "application/x-www-form-urlencoded", {}, 415),
        (
            "body too large",
            b'{"customer_id": "' + b"x" * 70_000 + b'"}',
            "application/json",
            {},
            413,
        ),
        (
            "idempotency key too long",
            b"{}",
            "application/json",
            {"Idempotency-Key": "k" * 256},
            400,
        ),
    ],
)
def test_malformed_requests_are_refused_before_anything_is_read_into_the_database(
    client: FlaskClient,
    engine: Engine,
    case: str,
    data: bytes,
    content_type: str,
    headers: dict[str, str],
    status: int,
) -> None:
    before = row_counts(engine)
    response = client.post(
        "/orders", data=data, content_type=content_type, headers={**AUTH, **headers}
    )
    assert response.status_code == status, case
    assert response.mimetype == "application/problem+json", case
    assert row_counts(engine) == before


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", f"Basic {API_KEY}", "Bearer ", API_KEY]
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/orders"),
        ("GET", "/orders/00000000-0000-0000-0000-000000000000"),
        ("GET", "/orders/00000000-0000-0000-0000-000000000000/status"),
    ],
)
def test_every_order_endpoint_needs_a_valid_api_key(
    client: FlaskClient, engine: Engine, authorization: str | None, method: str, path: str
) -> None:
    before = row_counts(engine)
    headers = {"Authorization": authorization} if authorization else {}
    response = client.open(path, method=method, json={}, headers=headers)
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert row_counts(engine) == before


def test_health_and_readiness(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["checks"] == ["database", "redis"]


def test_not_ready_when_redis_is_unreachable(settings: Settings, engine: Engine) -> None:
    from scripts.services import free_port

    app = create_app(
        replace(settings, broker_url=f"redis://127.0.0.1:{free_port()}/0"),
        starter=RecordingLauncher(),
        engine=engine,
    )
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["failed"] == {"redis": "ConnectionError"}
    assert response.headers["Retry-After"]


def test_serves_its_openapi_document(client: FlaskClient) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    doc = spec.json
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) >= {"/orders", "/orders/{order_id}", "/orders/{order_id}/status"}
    order_in = doc["components"]["schemas"]["OrderIn"]
    assert order_in["required"] == ["customer_id", "lines"]
    assert order_in["additionalProperties"] is False
    refs = json.dumps(doc)
    for name in doc["components"]["schemas"]:
        assert f"#/components/schemas/{name}" in refs or name == "OrderIn"
