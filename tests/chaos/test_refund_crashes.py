"""A refund whose workers are killed in the middle of its steps and of its completion
completes once: stock and credit are back exactly where they were before the order."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import Engine, select

from orders.tables import order_events
from tests.chaos.conftest import StackFactory
from tests.chaos.test_crash_windows import dead_letters, fired, place, world
from tests.harness.checker import require, settle
from tests.helpers import Stock, credit_of, stock_of, wait_for

pytestmark = pytest.mark.chaos

#: One kill in each refund step (before its commit, after it) and in its completion.
REFUND_KILLS = {
    "step.before_commit": "return_stock",
    "step.after_commit": "return_credit",
    "complete.before_commit": "refund",
}


@pytest.mark.parametrize("join", ["chord", "database"])
def test_a_refund_whose_workers_are_killed_mid_step_completes_once(
    make_stack: StackFactory, engine: Engine, join: str
) -> None:
    armed = ",".join(f"{point}@{key}=kill*1" for point, key in REFUND_KILLS.items())
    stack = make_stack(armed, SAGA_JOIN=join)
    api, w = stack.client(), world(engine)
    order_id = place(api, w, 2)
    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    assert stock_of(engine, w["product"]) == Stock(on_hand=3, reserved=0)

    answer = api.http.post(f"/orders/{order_id}/refund")
    assert answer.status_code == 202, answer.text
    wait_for(
        "the refund to complete",
        lambda: api.status(order_id)["status"] == "REFUNDED",
        timeout=90,
    )

    for point in REFUND_KILLS:
        assert fired(stack, point), point
    assert stock_of(engine, w["product"]) == Stock(on_hand=5, reserved=0)
    credit = credit_of(engine, w["customer"])
    assert (credit.used, credit.reserved) == (Decimal(0), Decimal(0))
    with engine.connect() as conn:
        refunded = conn.execute(
            select(order_events.c.type)
            .where(order_events.c.order_id == order_id)
            .where(order_events.c.type == "OrderRefunded")
        ).all()
    assert len(refunded) == 1
    assert dead_letters(engine, order_id) == 0
    require(settle(engine, w["world"]))
