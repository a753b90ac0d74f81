"""Hostile input on real PostgreSQL and Redis: every endpoint answers a problem document
(never a 500) to malformed filters and bodies, error lists stay small, ``/metrics`` stays
bounded, and no database error text reaches a client."""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from flask.testing import FlaskClient
from redis import Redis
from sqlalchemy import Engine, select, update

from config import names
from config.settings import Settings
from orders import services
from orders.api import create_app
from orders.domain import OrderLine, PlaceOrder
from orders.saga import DEFINITIONS, RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from orders.tables import order_events, products
from sagas import runner
from sagas.engine import SagaState
from tests.conftest import ADMIN_KEY, API_KEY, Servers
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product, row_counts
from workers.admin import Operations
from workers.celery_app import create_celery
from workers.escalation import escalate_compensation as escalate_to_an_operator

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
DEEP = b"[" * 10_000 + b"]" * 10_000


@pytest.fixture
def broker(settings: Settings, servers: Servers) -> Iterator[Settings]:
    own = replace(
        settings, broker_url=servers.redis.url(60), result_backend_url=servers.redis.url(61)
    )
    Redis.from_url(own.broker_url).flushdb()
    yield own
    Redis.from_url(own.broker_url).flushdb()


@pytest.fixture
def client(engine: Engine, broker: Settings) -> Iterator[FlaskClient]:
    operations = Operations(engine, create_celery(broker, publisher=True), broker, DEFINITIONS)
    app = create_app(broker, starter=RecordingLauncher(), engine=engine, operations=operations)
    with app.test_client() as client:
        yield client


@pytest.fixture
def refs(engine: Engine) -> dict[str, str]:
    return {
        "customer": add_customer(engine, limit="1000.00"),
        "product": add_product(engine, on_hand=10),
        "other": add_product(engine, on_hand=10),
    }


def refused(response: Any, status: int = 400) -> bool:
    """Whether the answer is the given 4xx as a problem document."""
    return (
        response.status_code == status
        and response.mimetype == "application/problem+json"
        and response.json["status"] == status
    )


@pytest.mark.parametrize(
    "query",
    [
        {"task": "saga.order\x00complete"},
        {"error": "\x00"},
        {"error": "a\x1b[31mred"},
        {"task": "tab\there"},
        {"task": "del\x7f"},
        {"error": "c1\x85control"},
        {"task": "t" * 201},
        {"error": "e" * 5000},
        {"state": "closed"},
        {"state": "open\x00"},
        {"limit": "abc"},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "9" * 5000},
        {"older_than_seconds": "nan"},
        {"older_than_seconds": "inf"},
        {"older_than_seconds": "-1"},
        {"older_than_seconds": "1e400"},
    ],
)
def test_the_dead_letter_list_refuses_bad_filters_with_400(
    client: FlaskClient, query: dict[str, str]
) -> None:
    assert refused(client.get("/admin/dead-letters", query_string=query, headers=ADMIN)), query


def test_the_longest_allowed_filters_are_answered(client: FlaskClient) -> None:
    query = {"task": "t" * 200, "error": "é%_\\" * 50, "limit": "1000"}
    response = client.get("/admin/dead-letters", query_string=query, headers=ADMIN)
    assert response.status_code == 200 and response.json == {"dead_letters": []}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/admin/dead-letters/99999999999999999999999999999", 404),
        ("GET", "/admin/dead-letters/9223372036854775808", 404),
        ("GET", "/admin/dead-letters/-1", 404),
        ("GET", "/admin/dead-letters/abc", 404),
        ("GET", "/admin/dead-letters/1%00", 404),
        ("POST", "/admin/dead-letters/99999999999999999999999999999/replay", 404),
        ("GET", "/batches/garbage", 404),
        ("GET", "/batches/" + "f" * 4000, 404),
        ("GET", "/batches/%00", 404),
        ("GET", "/batches/{00000000-0000-0000-0000-000000000000}", 404),
        ("DELETE", "/admin/dead-letters", 405),
    ],
)
def test_operator_endpoints_answer_garbage_ids_with_a_problem(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    assert refused(client.open(path, method=method, headers=ADMIN), status), path


@pytest.mark.parametrize("path", ["/admin/dead-letters/replay", "/admin/dead-letters/purge"])
@pytest.mark.parametrize(
    ("case", "data", "content_type", "status"),
    [
        ("10,000 levels deep", DEEP, "application/json", 400),
        ("33 levels deep", b'{"ids": ' + b"[" * 32 + b"]" * 32 + b"}", "application/json", 400),
        ("a duplicate key", b'{"ids": [1], "ids": [2]}', "application/json", 400),
        ("a nested duplicate key", b'{"ids": [{"a": 1, "a": 2}]}', "application/json", 400),
        ("not UTF-8", b'{"ids": [1], "note": "\xff\xfe"}', "application/json", 400),
        ("UTF-16", '{"ids": [1]}'.encode("utf-16"), "application/json", 400),
        ("NaN", b'{"ids": [NaN]}', "application/json", 400),
        ("malformed", b'{"ids": [1', "application/json", 400),
        ("empty", b"", "application/json", 400),
        ("too large", b'{"ids": [' + b"1, " * 30_000 + b"1]}", "application/json", 413),
        ("another media type", b'{"ids": [1]}', "text/plain", 415),
        ("ids as text", b'{"ids": ["1"]}', "application/json", 422),
        ("an id past BIGINT", b'{"ids": [9223372036854775808]}', "application/json", 422),
        ("no ids", b'{"ids": []}', "application/json", 422),
        ("null", b"null", "application/json", 422),
    ],
)
def test_operator_bodies_are_read_strictly(
    client: FlaskClient, path: str, case: str, data: bytes, content_type: str, status: int
) -> None:
    response = client.post(path, data=data, content_type=content_type, headers=ADMIN)
    assert refused(response, status), (case, response.status_code, response.data[:300])


def test_an_order_nested_10_000_levels_deep_or_not_utf8_is_refused(
    client: FlaskClient, engine: Engine
) -> None:
    before = row_counts(engine)
    for data in (DEEP, b'{"customer_id": "\xff"}'):
        response = client.post("/orders", data=data, content_type="application/json", headers=AUTH)
        assert refused(response), response.data[:300]
    assert row_counts(engine) == before


def test_an_order_with_a_key_given_twice_is_refused_and_writes_nothing(
    client: FlaskClient, engine: Engine, refs: dict[str, str]
) -> None:
    """POST /orders reads its body with ``orders.api.bodies.read_json``."""
    c, p, q = refs["customer"], refs["product"], refs["other"]
    line = f'{{"product_id": "{p}", "quantity": 1}}'
    bodies = [
        f'{{"customer_id": "{c}", "customer_id": "{c}", "lines": [{line}]}}',
        f'{{"customer_id": "{c}", "lines": [{line}], "lines": [{line}]}}',
        f'{{"customer_id": "{c}", "lines": [{{"product_id": "{p}", "product_id": "{q}",'
        f' "quantity": 1}}]}}',
        f'{{"customer_id": "{c}", "lines": [{{"product_id": "{p}", "quantity": 1,'
        f' "quantity": 9}}]}}',
    ]
    before = row_counts(engine)
    for body in bodies:
        response = client.post("/orders", data=body, content_type="application/json", headers=AUTH)
        assert refused(response), (body, response.status_code, response.data[:300])
        assert "appears twice" in response.json["detail"]
    assert row_counts(engine) == before


def test_a_60_kb_body_of_bad_lines_gets_a_short_capped_error_list(
    client: FlaskClient, engine: Engine, refs: dict[str, str]
) -> None:
    bad = {"product_id": "", "quantity": -1, "colour": "red"}  # three errors per line
    body = json.dumps({"customer_id": refs["customer"], "lines": [bad] * 1200})
    assert 55_000 < len(body) < 64 * 1024
    before = row_counts(engine)
    response = client.post("/orders", data=body, content_type="application/json", headers=AUTH)
    assert refused(response, 422)
    assert len(response.data) < 16 * 1024, len(response.data)
    assert len(response.json["errors"]) == 20
    assert response.json["errors_omitted"] == 3 * 1200 - 20
    assert row_counts(engine) == before


def test_the_limits_rules_error_list_is_capped_too(
    client: FlaskClient, engine: Engine, refs: dict[str, str]
) -> None:
    line = {"product_id": refs["product"], "quantity": 1}  # the same product, every line
    body = json.dumps({"customer_id": refs["customer"], "lines": [line] * 1200})
    assert len(body) < 64 * 1024
    response = client.post("/orders", data=body, content_type="application/json", headers=AUTH)
    assert refused(response, 422)
    assert len(response.data) < 16 * 1024, len(response.data)
    assert len(response.json["errors"]) == 20
    assert response.json["errors_omitted"] == 1200 - 20  # "at most N lines" + 1199 twice


def test_an_unknown_key_named_in_an_error_is_cut_short(
    client: FlaskClient, refs: dict[str, str]
) -> None:
    line = {"product_id": refs["product"], "quantity": 1}
    body = json.dumps({"customer_id": refs["customer"], "lines": [line], "k" * 50_000: 1})
    response = client.post("/orders", data=body, content_type="application/json", headers=AUTH)
    assert refused(response, 422)
    assert len(response.data) < 2048, len(response.data)


def series(client: FlaskClient) -> int:
    exposition = client.get("/metrics").get_data(as_text=True)
    return sum(1 for line in exposition.splitlines() if line and not line.startswith("#"))


def test_made_up_methods_and_paths_add_a_handful_of_metric_series(client: FlaskClient) -> None:
    chance = random.Random(12)
    for path in ("/orders", "/admin/dead-letters", "/no/such/path"):  # the known ones first
        for method in ("GET", "POST", "BREW"):
            client.open(path, method=method)
    before = series(client)
    for n in range(2000):
        method = "".join(chance.choices(string.ascii_uppercase, k=10))
        path = chance.choice(("/orders", "/admin/dead-letters", f"/no/such/{n}"))
        response = client.open(path, method=method, headers=AUTH)
        assert response.status_code in (401, 403, 404, 405), (method, path)
        assert response.mimetype == "application/problem+json"
    after = series(client)
    assert after - before <= 20, (before, after)


def test_a_compensation_that_fails_in_the_database_shows_the_client_no_sql(
    client: FlaskClient, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # An order over the credit limit: its reserved stock must be released.
    customer, product = add_customer(engine, limit="5.00"), add_product(engine, on_hand=5)
    launcher = RecordingLauncher()
    cmd = PlaceOrder(customer, (OrderLine(product, 2),), client="tests")
    order_id = services.place_order(engine, cmd, launcher).order_id
    (start,) = launcher.launched
    saga = OrderSaga()
    for step in (RESERVE_STOCK, RESERVE_CREDIT):
        runner.run_step(engine, saga, start.saga_id, step, start.payload)
    # Someone zeroed the reservation by hand: giving 2 units back breaks reserved >= 0.
    with engine.begin() as conn:
        conn.execute(update(products).where(products.c.id == product).values(reserved=0))

    with caplog.at_level(logging.ERROR, logger="sagas.runner"):
        done = runner.complete(
            engine,
            saga,
            start.saga_id,
            retry_after=lambda attempts: None,
            escalate=escalate_to_an_operator,
        )
    assert done.decision is not None and done.decision.state is SagaState.COMPENSATION_FAILED

    shown = client.get(f"/orders/{order_id}", headers=AUTH)
    assert shown.json["status"] == "COMPENSATION_FAILED"
    assert shown.json["problem"] == f"IntegrityError: {runner.COMPENSATION_LEFT}"
    listed = client.get(f"/customers/{customer}/orders", headers=AUTH)
    for answer in (shown, listed):
        text = answer.get_data(as_text=True)
        for leak in ("SQL", "parameters", "DETAIL", "Failing row", "reserved_not_negative"):
            assert leak not in text, (leak, text)
    with engine.connect() as conn:
        payloads = conn.execute(
            select(order_events.c.payload).where(
                order_events.c.order_id == order_id,
                order_events.c.type == "OrderCompensationFailed",
            )
        ).scalars()
        assert [p["problem"] for p in payloads] == [shown.json["problem"]]

    # Operators see the whole error, parameters excepted, in the dead letter and the log.
    letters = client.get(
        "/admin/dead-letters",
        query_string={"task": names.COMPLETE_ORDER, "error": "reserved_not_negative"},
        headers=ADMIN,
    ).json["dead_letters"]
    (letter,) = [one for one in letters if one["task_id"] == f"{start.saga_id}.compensation"]
    for full in (letter["error"], caplog.text):
        assert "DETAIL:  Failing row contains" in full and "[SQL: " in full, full
        assert "parameters hidden" in full, full
