"""Keys scoped to customers, on a real database: a key acts and reads only for its
customers; everything else is answered as if it did not exist, and writes nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from config.settings import Settings
from orders import keys
from orders.api import create_app
from orders.saga_timeline import SqlTimeline
from orders.tables import api_keys, idempotency_keys
from tests.conftest import API_KEY
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product, row_counts


@pytest.fixture
def client(settings: Settings, engine: Engine) -> Iterator[FlaskClient]:
    app = create_app(
        settings,
        starter=RecordingLauncher(),
        engine=engine,
        timeline=SqlTimeline(engine),
    )
    with app.test_client() as client:
        yield client


@pytest.fixture
def world(engine: Engine, owner_engine: Engine) -> dict[str, str]:
    """Customers A and B, a product, a key for each customer and an all-customers key."""
    a, b = add_customer(engine, limit="1000.00"), add_customer(engine, limit="1000.00")
    with owner_engine.begin() as conn:  # keys are the owner's to make
        key_a = keys.create(conn, "client of A", customer_ids=[a])[1]
        key_b = keys.create(conn, "client of B", customer_ids=[b])[1]
    return {
        "a": a,
        "b": b,
        "product": add_product(engine, on_hand=100),
        "key_a": key_a,
        "key_b": key_b,
    }


def auth(key: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **more}


def place(client: FlaskClient, key: str, customer: str, product: str, **headers: str):
    body = {"customer_id": customer, "lines": [{"product_id": product, "quantity": 1}]}
    return client.post(
        "/orders",
        data=json.dumps(body),
        content_type="application/json",
        headers=auth(key, **headers),
    )


def masked(response: Any, order_id: str, customer_id: str) -> str:
    """The answer's body with the ids it was asked about blanked out."""
    text = response.get_data(as_text=True)
    return text.replace(order_id, "<order>").replace(customer_id, "<customer>")


def test_a_key_sees_nothing_of_another_customer(
    client: FlaskClient, engine: Engine, world: dict[str, str]
) -> None:
    placed = place(client, world["key_b"], world["b"], world["product"])
    assert placed.status_code == 202
    order_b = placed.json["order_id"]
    before = row_counts(engine)

    # Each answer is the one for an order or customer that does not exist at all, word
    # for word but the id: nothing tells "not yours" from "not there".
    ghost_order, ghost_customer = str(uuid4()), f"NO-SUCH-{uuid4().hex[:8].upper()}"
    for template in (
        "/orders/{o}",
        "/orders/{o}/status",
        "/orders/{o}/timeline",
        "/orders/{o}/timeline.html",
        "/customers/{c}/orders",
        "/customers/{c}/summary",
        "/customers/{c}/credit",
    ):
        real = client.get(template.format(o=order_b, c=world["b"]), headers=auth(world["key_a"]))
        ghost = client.get(
            template.format(o=ghost_order, c=ghost_customer), headers=auth(world["key_a"])
        )
        assert real.status_code == ghost.status_code == 404, template
        assert real.mimetype == ghost.mimetype == "application/problem+json"
        assert masked(real, order_b, world["b"]) == masked(ghost, ghost_order, ghost_customer)

    statuses = client.get(f"/orders/status?ids={order_b}", headers=auth(world["key_a"]))
    assert statuses.status_code == 200
    assert statuses.json == {"statuses": [], "unknown": [order_b]}

    # Placing an order for B with A's key: 404, nothing written.
    refused = place(client, world["key_a"], world["b"], world["product"])
    assert refused.status_code == 404
    assert refused.mimetype == "application/problem+json"
    assert row_counts(engine) == before
    # ... the same answer as for a customer that does not exist.
    nobody = place(client, world["key_a"], ghost_customer, world["product"])
    assert nobody.status_code == 404
    assert masked(refused, order_b, world["b"]) == masked(nobody, ghost_order, ghost_customer)

    # B's own key and an all-customers key see it.
    for key in (world["key_b"], API_KEY):
        assert client.get(f"/orders/{order_b}", headers=auth(key)).status_code == 200
        assert client.get(f"/customers/{world['b']}/credit", headers=auth(key)).status_code == 200
        assert client.get(f"/orders/{order_b}/timeline", headers=auth(key)).status_code == 200


def test_a_key_acts_for_its_own_customer(client: FlaskClient, world: dict[str, str]) -> None:
    placed = place(client, world["key_a"], world["a"], world["product"])
    assert placed.status_code == 202
    order_a = placed.json["order_id"]
    assert (
        client.get(f"/orders/{order_a}", headers=auth(world["key_a"])).json["customer_id"]
        == world["a"]
    )
    listed = client.get(f"/customers/{world['a']}/orders", headers=auth(world["key_a"]))
    assert [o["order_id"] for o in listed.json["orders"]] == [order_a]


def test_idempotency_keys_stay_each_keys_own(
    client: FlaskClient, engine: Engine, owner_engine: Engine, world: dict[str, str]
) -> None:
    with owner_engine.begin() as conn:
        other_a = keys.create(conn, "second client of A", customer_ids=[world["a"]])[1]
    first = place(client, world["key_a"], world["a"], world["product"], **{"Idempotency-Key": "k1"})
    again = place(client, world["key_a"], world["a"], world["product"], **{"Idempotency-Key": "k1"})
    other = place(client, other_a, world["a"], world["product"], **{"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json["order_id"] == again.json["order_id"] != other.json["order_id"]
    with engine.connect() as conn:
        clients = conn.execute(
            select(idempotency_keys.c.client).where(
                idempotency_keys.c.order_id.in_(
                    [UUID(first.json["order_id"]), UUID(other.json["order_id"])]
                )
            )
        ).scalars()
        assert sorted(clients) == sorted([keys.key_id_of(world["key_a"]), keys.key_id_of(other_a)])


def test_revoking_a_key_takes_effect_on_the_next_request(
    client: FlaskClient, owner_engine: Engine, world: dict[str, str]
) -> None:
    path = f"/customers/{world['a']}/credit"
    assert client.get(path, headers=auth(world["key_a"])).status_code == 200
    with owner_engine.begin() as conn:
        assert keys.revoke(conn, keys.key_id_of(world["key_a"]) or "")
    refused = client.get(path, headers=auth(world["key_a"]))
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")


def test_keys_are_stored_as_digests_only(engine: Engine, world: dict[str, str]) -> None:
    with engine.connect() as conn:
        stored = conn.execute(select(api_keys)).all()
    dump = repr(stored)
    for name in ("key_a", "key_b"):
        secret = world[name].rsplit("_", 1)[1]
        assert secret not in dump
    assert {row.secret_hash for row in stored} >= {keys.digest(world["key_a"])}


def test_a_client_key_on_an_operator_endpoint_is_forbidden(
    settings: Settings, engine: Engine, world: dict[str, str]
) -> None:
    from orders.saga import DEFINITIONS
    from workers.admin import Operations
    from workers.celery_app import create_celery

    app = create_app(
        settings,
        starter=RecordingLauncher(),
        engine=engine,
        operations=Operations(
            engine, create_celery(settings, publisher=True), settings, DEFINITIONS
        ),
    )
    with app.test_client() as client:
        for key in (world["key_a"], API_KEY):
            forbidden = client.get("/admin/dead-letters", headers=auth(key))
            assert forbidden.status_code == 403
            assert forbidden.mimetype == "application/problem+json"
        assert client.get("/admin/dead-letters").status_code == 401


def test_an_operators_key_acts_for_every_customer(
    owner_engine: Engine, world: dict[str, str]
) -> None:
    with owner_engine.begin() as conn, pytest.raises(ValueError, match="every customer"):
        keys.create(conn, "scoped operator", role=keys.Role.OPERATOR, customer_ids=[world["a"]])
    # The table refuses one too, whoever writes it.
    with owner_engine.begin() as conn, pytest.raises(IntegrityError, match="operator_every"):
        conn.execute(
            api_keys.insert().values(
                id="abcdefabcdef",
                name="scoped operator",
                role="operator",
                customers=[world["a"]],
                secret_hash="0" * 64,
            )
        )
