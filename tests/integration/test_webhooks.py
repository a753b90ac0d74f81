"""Webhooks on a real database and a real HTTP receiver: the API keeps each key to its
own endpoints and refuses what may not receive webhooks (problem+json); the outbox
consumer makes one delivery per final event and endpoint; the sender signs it, retries
it with backoff, logs each attempt, and gives up into a dead letter that replays."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from uuid import UUID

import httpx
import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, func, select

from config.database import transaction
from config.settings import Settings
from orders import keys, services, webhooks
from orders.api import create_app
from orders.domain import OrderLine, PlaceOrder
from orders.events import Event, deliver
from orders.tables import order_events, webhook_attempts, webhook_deliveries
from orders.webhook_deliveries import WebhookOutbox, event_id
from tests.fakes import RecordingLauncher
from tests.harness.receiver import Receiver
from tests.helpers import add_customer, add_product, wait_for
from workers.tables import dead_letters
from workers.webhooks import send_due

PROBLEM = "application/problem+json"


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[FlaskClient]:
    with create_app(settings, starter=RecordingLauncher(), engine=engine).test_client() as c:
        yield c


@pytest.fixture
def world(engine: Engine, owner_engine: Engine) -> dict[str, str]:
    """A customer, a product, and two client keys of the customer's."""
    customer = add_customer(engine, limit="1000.00")
    with owner_engine.begin() as conn:
        first_id, first = keys.create(conn, "webhooks: first", customer_ids=[customer])
        second_id, second = keys.create(conn, "webhooks: second", customer_ids=[customer])
    return {
        "customer": customer,
        "product": add_product(engine, on_hand=100),
        "key": first,
        "key_id": first_id,
        "other": second,
        "other_id": second_id,
    }


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def register(client: FlaskClient, key: str, url: str) -> Any:
    return client.post(
        "/webhooks",
        data=json.dumps({"url": url}),
        content_type="application/json",
        headers=auth(key),
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/hook", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://metadata.google.internal/", "metadata"),
        ("http://user:secret@example.com/", "user or password"),
        ("http://[fe80::1]/", "host name or IPv4"),
        ("http://example.com:70000/", "port"),
    ],
)
def test_refuses_a_url_that_may_not_receive_webhooks(
    client: FlaskClient, world: dict[str, str], url: str, why: str
) -> None:
    answer = register(client, world["key"], url)

    assert answer.status_code == 422
    assert answer.mimetype == PROBLEM
    assert why in answer.json["detail"]
    assert answer.json["errors"][0]["loc"] == "url"


def test_refuses_a_body_that_is_not_an_endpoint(client: FlaskClient, world: dict[str, str]) -> None:
    missing = client.post(
        "/webhooks", data="{}", content_type="application/json", headers=auth(world["key"])
    )
    extra = client.post(
        "/webhooks",
        data=json.dumps({"url": "http://example.com/", "events": ["all"]}),
        content_type="application/json",
        headers=auth(world["key"]),
    )
    not_json = client.post("/webhooks", data="url=x", headers=auth(world["key"]))
    no_key = client.post("/webhooks", data="{}", content_type="application/json")

    assert (missing.status_code, extra.status_code) == (422, 422)
    assert missing.json["title"] == "Invalid webhook"
    assert not_json.status_code == 415
    assert no_key.status_code == 401
    assert {a.mimetype for a in (missing, extra, not_json, no_key)} == {PROBLEM}


def test_production_takes_https_only(settings: Settings) -> None:
    with pytest.raises(webhooks.InvalidWebhookUrlError, match="https"):
        webhooks.check_url("http://example.com/hook", "production")
    with pytest.raises(webhooks.InvalidWebhookUrlError, match="this machine"):
        webhooks.check_url("https://127.0.0.1/hook", "production")
    assert webhooks.check_url("https://example.com/hook", "production")


def test_a_key_sees_and_changes_only_its_own_endpoints(
    client: FlaskClient, world: dict[str, str]
) -> None:
    made = register(client, world["key"], "http://example.com/hook")
    assert made.status_code == 201
    endpoint = made.json["id"]
    assert made.headers["Location"] == f"/webhooks/{endpoint}"
    assert made.json["secret"].startswith("whsec_")
    other = auth(world["other"])

    assert client.get("/webhooks", headers=other).json == {"endpoints": []}
    for answer in (
        client.delete(f"/webhooks/{endpoint}", headers=other),
        client.post(f"/webhooks/{endpoint}/rotate", headers=other),
        client.get(f"/webhooks/{endpoint}/deliveries", headers=other),
    ):
        assert (answer.status_code, answer.mimetype) == (404, PROBLEM)

    listed = client.get("/webhooks", headers=auth(world["key"])).json["endpoints"]
    assert [e["id"] for e in listed] == [endpoint]
    assert "secret" not in listed[0]
    rotated = client.post(f"/webhooks/{endpoint}/rotate", headers=auth(world["key"]))
    assert rotated.status_code == 200
    assert rotated.json["secret"] != made.json["secret"]
    assert rotated.json["previous_secret_expires_at"] is not None
    assert client.delete(f"/webhooks/{endpoint}", headers=auth(world["key"])).status_code == 204
    assert client.get("/webhooks", headers=auth(world["key"])).json == {"endpoints": []}
    gone = client.delete(f"/webhooks/{endpoint}", headers=auth(world["key"]))
    assert gone.status_code == 404


def test_an_unknown_delivery_or_one_not_dead_is_not_replayed(
    client: FlaskClient, world: dict[str, str]
) -> None:
    unknown = client.post(
        "/webhooks/deliveries/00000000-0000-0000-0000-000000000000/replay",
        headers=auth(world["key"]),
    )
    assert (unknown.status_code, unknown.mimetype) == (404, PROBLEM)
    bad = client.get("/webhooks/not-a-uuid/deliveries", headers=auth(world["key"]))
    assert bad.status_code == 404


def _final_state(engine: Engine, key_id: str, customer: str, product: str) -> list[Event]:
    """An order placed by ``key_id`` and cancelled: its events."""
    cmd = PlaceOrder(customer, (OrderLine(product, 1),), client=key_id)
    order = services.place_order(engine, cmd, RecordingLauncher()).order_id
    with transaction(engine) as conn:
        services.cancel_order(conn, order, "out_of_stock")
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                order_events.c.id,
                order_events.c.order_id,
                order_events.c.seq,
                order_events.c.type,
                order_events.c.payload,
                order_events.c.occurred_at,
            )
            .where(order_events.c.order_id == order)
            .order_by(order_events.c.seq)
        ).all()
    return [Event(*row) for row in rows]


def _deliveries(engine: Engine, order_id: UUID) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.order_id == order_id)
            ).all()
        )


def test_a_final_state_is_delivered_once_signed_after_three_failures(
    client: FlaskClient, engine: Engine, settings: Settings, world: dict[str, str]
) -> None:
    fast = replace(
        settings,
        webhook_backoff_seconds=0.01,
        webhook_backoff_max_seconds=0.02,
        webhook_max_attempts=4,
    )
    with Receiver(fail_first=3) as receiver, httpx.Client(timeout=2) as http:
        secret = register(client, world["key"], receiver.url).json["secret"]
        events = _final_state(engine, world["key_id"], world["customer"], world["product"])
        order = events[0].order_id
        deliver(engine, WebhookOutbox(), events)
        # Applied again (a redelivered batch, a repair): no second delivery.
        with transaction(engine) as conn:
            WebhookOutbox().apply(conn, events)

        def delivered() -> bool:
            send_due(engine, fast, http, run_seconds=1)
            return _deliveries(engine, order)[0].state == "DELIVERED"

        wait_for("the delivery", delivered, timeout=20)

    [row] = _deliveries(engine, order)
    assert row.attempts == 4
    sent = receiver.all()
    assert [r.status for r in sent] == [500, 500, 500, 200]
    assert {r.headers["webhook-id"] for r in sent} == {event_id(order, 2)}
    [accepted] = receiver.accepted()
    assert webhooks.verify(secret, accepted.body, accepted.headers)
    forged_body = accepted.body.replace(b"CANCELLED", b"CONFIRMED")
    assert not webhooks.verify(secret, forged_body, accepted.headers)
    assert not webhooks.verify(webhooks.new_secret(), accepted.body, accepted.headers)
    body = json.loads(accepted.body)
    assert body["type"] == "order.cancelled"
    assert body["data"]["order_id"] == str(order)
    assert body["data"]["reason"] == "out_of_stock"
    with engine.connect() as conn:
        logged = conn.execute(
            select(webhook_attempts.c.status_code)
            .where(webhook_attempts.c.delivery_id == row.id)
            .order_by(webhook_attempts.c.id)
        ).scalars()
        assert list(logged) == [500, 500, 500, 200]
    log = client.get(f"/webhooks/{row.endpoint_id}/deliveries", headers=auth(world["key"])).json[
        "deliveries"
    ]
    assert [(d["state"], d["attempts"]) for d in log] == [("DELIVERED", 4)]
    assert [a["status_code"] for a in log[0]["attempt_log"]] == [500, 500, 500, 200]


def test_a_rotated_endpoint_is_signed_with_both_secrets_during_the_grace(
    client: FlaskClient, engine: Engine, settings: Settings, world: dict[str, str]
) -> None:
    with Receiver() as receiver, httpx.Client(timeout=2) as http:
        made = register(client, world["key"], receiver.url).json
        rotated = client.post(f"/webhooks/{made['id']}/rotate", headers=auth(world["key"])).json
        events = _final_state(engine, world["key_id"], world["customer"], world["product"])
        deliver(engine, WebhookOutbox(), events)
        wait_for(
            "the delivery",
            lambda: send_due(engine, settings, http, run_seconds=1) and receiver.accepted(),
            timeout=20,
        )
    [accepted] = receiver.accepted()
    assert len(accepted.headers["webhook-signature"].split(" ")) == 2
    assert webhooks.verify(made["secret"], accepted.body, accepted.headers)
    assert webhooks.verify(rotated["secret"], accepted.body, accepted.headers)


def test_a_delivery_that_used_up_its_attempts_is_a_dead_letter_and_replays(
    client: FlaskClient, engine: Engine, settings: Settings, world: dict[str, str]
) -> None:
    fast = replace(
        settings,
        webhook_backoff_seconds=0.01,
        webhook_backoff_max_seconds=0.02,
        webhook_max_attempts=2,
    )
    with Receiver(fail_first=2) as receiver, httpx.Client(timeout=2) as http:
        register(client, world["key"], receiver.url)
        events = _final_state(engine, world["key_id"], world["customer"], world["product"])
        order = events[0].order_id
        deliver(engine, WebhookOutbox(), events)

        def state() -> str:
            send_due(engine, fast, http, run_seconds=1)
            return str(_deliveries(engine, order)[0].state)

        wait_for("the delivery to die", lambda: state() == "DEAD", timeout=20)
        [row] = _deliveries(engine, order)
        letter = f"webhook:{row.id}"
        with engine.connect() as conn:
            kind, letter_state = conn.execute(
                select(dead_letters.c.kind, dead_letters.c.state).where(
                    dead_letters.c.task_id == letter
                )
            ).one()
        assert (kind, letter_state) == ("webhook_dead", "OPEN")

        replayed = client.post(f"/webhooks/deliveries/{row.id}/replay", headers=auth(world["key"]))
        assert replayed.status_code == 202
        again = client.post(f"/webhooks/deliveries/{row.id}/replay", headers=auth(world["key"]))
        assert (again.status_code, again.mimetype) == (409, PROBLEM)
        other = client.post(f"/webhooks/deliveries/{row.id}/replay", headers=auth(world["other"]))
        assert other.status_code == 404
        wait_for("the replayed delivery", lambda: state() == "DELIVERED", timeout=20)

    assert [r.status for r in receiver.all()] == [500, 500, 200]
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(dead_letters.c.state).where(dead_letters.c.task_id == letter)
            ).scalar_one()
            == "REPLAYED"
        )
        count = conn.execute(
            select(func.count())
            .select_from(webhook_attempts)
            .where(webhook_attempts.c.delivery_id == row.id)
        ).scalar_one()
    assert count == 3


def test_an_order_placed_by_another_key_is_not_announced(
    client: FlaskClient, engine: Engine, world: dict[str, str]
) -> None:
    register(client, world["key"], "http://example.com/hook")
    events = _final_state(engine, world["other_id"], world["customer"], world["product"])
    deliver(engine, WebhookOutbox(), events)

    assert _deliveries(engine, events[0].order_id) == []


def test_a_refund_is_announced_as_order_refunded(
    client: FlaskClient, engine: Engine, world: dict[str, str]
) -> None:
    register(client, world["key"], "http://example.com/hook")
    events = _final_state(engine, world["key_id"], world["customer"], world["product"])
    last = events[-1]
    # The refund's event as the refund saga appends it (the consumer keys on its type).
    refunded = replace(last, id=last.id + 10**12, seq=last.seq + 1, type="OrderRefunded")
    deliver(engine, WebhookOutbox(), [*events, refunded])

    rows = _deliveries(engine, last.order_id)
    assert sorted(row.event_type for row in rows) == ["order.cancelled", "order.refunded"]
    [refund] = [row for row in rows if row.event_type == "order.refunded"]
    assert refund.payload["data"]["status"] == "REFUNDED"
    assert refund.event_id == event_id(last.order_id, last.seq + 1)
