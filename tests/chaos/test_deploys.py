"""A deploy, or any outage of the saga workers, delays orders and decides none of them:
orders accepted while no saga worker runs end, once workers are back, exactly as stock
and credit decide, within seconds."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from redis import Redis
from sqlalchemy import Engine, Text, cast, func, select

from config import names
from orders.tables import orders
from sagas.tables import sagas
from tests.chaos.conftest import StackFactory
from tests.harness.checker import require, settle, world_of
from tests.harness.processes import WorkerSpec
from tests.helpers import add_customer, add_product, wait_for
from workers import liveness
from workers.tables import dead_letters

pytestmark = pytest.mark.chaos

#: The sweeper looks at a saga 2 s after its dispatch. Before, it gave a saga
#: deadline x (1 + one redrive) = 4 s, then cancelled it.
DEADLINE = 2.0
OUTAGE = 3 * DEADLINE * 2
LANES_APART = [
    WorkerSpec("worker", "saga.high", concurrency=2),
    WorkerSpec("worker-lanes", "default,batch.low", concurrency=1),
]


def test_orders_accepted_while_the_saga_workers_are_down_are_decided_on_their_merits(
    make_stack: StackFactory, engine: Engine
) -> None:
    stack = make_stack(workers=LANES_APART, SAGA_DEADLINE_SECONDS=str(DEADLINE))
    rich, poor = add_customer(engine, limit="1000000.00"), add_customer(engine, limit="50.00")
    plenty, scarce = add_product(engine, on_hand=1000), add_product(engine, on_hand=10)
    # 250 orders anyone would confirm; 25 on a credit of 5 orders; 25 on a stock of 10.
    load = [(rich, plenty)] * 250 + [(poor, plenty)] * 25 + [(rich, scarce)] * 25
    api = stack.client()
    began = datetime.now(UTC)

    saga_worker = stack.service("worker")
    saga_worker.stop()
    stopped = time.monotonic()

    def place(order: tuple[str, str]) -> str:
        response = api.place(order[0], [(order[1], 1)])
        assert response.status_code == 202, response.text
        return str(response.json()["order_id"])

    with ThreadPoolExecutor(max_workers=4) as pool:
        order_ids = list(pool.map(place, load))
    wait_for(
        "the outage to last 3 x the old redrive window",
        lambda: time.monotonic() - stopped >= OUTAGE,
        timeout=OUTAGE + 5,
    )
    wait_for(
        "the sweeper to have looked at the waiting sagas",
        lambda: _looked_at(engine, order_ids[0]) >= 1,
        timeout=20,
    )
    statuses = Counter(api.status(order_id)["status"] for order_id in order_ids)
    assert statuses == {"PENDING": 300}, "nothing is decided while no saga worker runs"

    saga_worker.start()
    back = time.monotonic()
    final = wait_for(
        "every order to be decided once the saga worker is back",
        lambda: (
            (s := [api.status(order_id) for order_id in order_ids])
            and all(o["status"] in ("CONFIRMED", "CANCELLED") for o in s)
            and s
        ),
        timeout=30,
        interval=0.5,
    )
    took = time.monotonic() - back
    outcomes = Counter((o["status"], o.get("cancel_reason")) for o in final)
    assert outcomes == {
        ("CONFIRMED", None): 250 + 5 + 10,
        ("CANCELLED", "credit_limit_exceeded"): 20,
        ("CANCELLED", "out_of_stock"): 15,
    }, f"decided {took:.1f} s after the workers came back"
    with engine.connect() as conn:
        letters = select(func.count()).where(dead_letters.c.first_failed_at >= began)
        redrives = select(func.sum(sagas.c.redrives)).where(sagas.c.created_at >= began)
        assert conn.execute(letters).scalar_one() == 0
        # The backlog was worked off, not sent again: at most the last few messages,
        # overdue while running when the lane caught up, were redriven.
        assert conn.execute(redrives).scalar_one() < liveness.CAUGHT_UP_DEPTH
    require(settle(engine, world_of([rich, poor], {plenty: 1000, scarce: 10})))


def test_a_saga_lost_while_the_saga_workers_were_down_is_finished_soon_after_they_return(
    make_stack: StackFactory, engine: Engine
) -> None:
    stack = make_stack(workers=LANES_APART, SAGA_DEADLINE_SECONDS=str(DEADLINE))
    broker = Redis.from_url(stack.settings.broker_url)
    customer, product = add_customer(engine, limit="100.00"), add_product(engine, on_hand=5)
    api = stack.client()
    assert liveness.consumers(broker, names.SAGA_QUEUE) == 1

    saga_worker = stack.service("worker")
    saga_worker.stop()
    assert liveness.consumers(broker, names.SAGA_QUEUE) == 0  # a clean stop says so at once
    response = api.place(customer, [(product, 2)])
    assert response.status_code == 202
    order_id = str(response.json()["order_id"])
    broker.delete(names.SAGA_QUEUE)  # its messages are lost (Redis lost its data, say)

    wait_for(
        "the sweeper to have looked at the overdue saga twice",
        lambda: _looked_at(engine, order_id) >= 2,
        timeout=20,
    )
    # Nothing was sent to a lane no one consumes, and nothing was decided.
    assert broker.llen(names.SAGA_QUEUE) == 0
    assert api.status(order_id)["status"] == "PENDING"

    saga_worker.start()
    back = time.monotonic()
    final = api.wait_until_final(order_id, timeout=20)
    assert final["status"] == "CONFIRMED", f"{time.monotonic() - back:.1f} s after the return"
    require(settle(engine, world_of([customer], {product: 5})))
    broker.close()


def _looked_at(engine: Engine, order_id: str) -> int:
    """How many times the sweeper took the order's saga up."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(sagas.c.recovery_attempts)
                .join(orders, orders.c.saga_id == sagas.c.id)
                .where(cast(orders.c.id, Text) == order_id)
            ).scalar_one()
        )
