"""The saga timeline read back through the API, from the ledger on a real database."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from sqlalchemy import Engine

from config.settings import Settings
from orders import services
from orders.api import create_app
from orders.domain import OrderLine, PlaceOrder
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from orders.saga_timeline import SqlTimeline
from sagas import runner
from tests.conftest import API_KEY
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_the_timeline_shows_each_step_with_its_times_outcome_and_attempts(
    settings: Settings, engine: Engine
) -> None:
    saga = OrderSaga()
    launcher = RecordingLauncher()
    customer, product = add_customer(engine, limit="5.00"), add_product(engine, on_hand=3)
    accepted = services.place_order(
        engine, PlaceOrder(customer, (OrderLine(product, 1),), client="t"), launcher
    )
    (start,) = launcher.launched
    runner.run_step(engine, saga, start.saga_id, RESERVE_STOCK, start.payload, attempt=2)
    runner.run_step(engine, saga, start.saga_id, RESERVE_CREDIT, start.payload)
    runner.run_step(engine, saga, start.saga_id, RESERVE_CREDIT, start.payload)  # redelivered
    runner.complete(engine, saga, start.saga_id, retry_after=timedelta(seconds=60))

    app = create_app(
        replace(settings), starter=launcher, engine=engine, timeline=SqlTimeline(engine)
    )
    client = app.test_client()
    body = client.get(f"/orders/{accepted.order_id}/timeline", headers=AUTH).json
    assert (body["state"], body["reason"]) == ("CANCELLED", "credit_limit_exceeded")
    steps = {step["step"]: step for step in body["steps"]}
    assert (steps[RESERVE_STOCK]["outcome"], steps[RESERVE_STOCK]["attempts"]) == ("COMPENSATED", 2)
    assert (steps[RESERVE_CREDIT]["outcome"], steps[RESERVE_CREDIT]["attempts"]) == ("REFUSED", 2)
    for step in steps.values():
        assert step["started_at"] <= step["finished_at"] <= body["finished_at"]
        assert body["accepted_at"] <= step["started_at"]

    page = client.get(f"/orders/{accepted.order_id}/timeline.html", headers=AUTH)
    assert page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for name in ("waiting for a worker", RESERVE_STOCK, RESERVE_CREDIT, "decision"):
        assert f'class="bar" data-step="{name}"' in html
    assert "credit_limit_exceeded" in html

    assert client.get(f"/orders/{accepted.order_id}/timeline").status_code == 401
    missing = client.get("/orders/00000000-0000-0000-0000-000000000000/timeline", headers=AUTH)
    assert missing.status_code == 404
