"""Every crash window, opened on purpose in the real processes, ends in a correct final
state: the process dies at a named failpoint (or is killed), and the order still ends
CONFIRMED or CANCELLED with stock and credit exactly right."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, Text, cast, func, select

from scripts.services import LocalRedis
from tests.chaos.conftest import StackFactory
from tests.conftest import Servers
from tests.harness.checker import require, settle, world_of
from tests.harness.client import Api
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product, wait_for
from workers.tables import dead_letters as dead_letter_table

pytestmark = pytest.mark.chaos


def fired(stack: Stack, failpoint: str) -> bool:
    """Whether the failpoint went off (it leaves a marker per firing)."""
    return (stack.log_dir / "failpoints" / f"{failpoint}.0").exists()


def world(engine: Engine, *, limit: str = "100.00", on_hand: int = 5) -> dict[str, Any]:
    customer = add_customer(engine, limit=limit)
    product = add_product(engine, on_hand=on_hand, price="10.00")
    return {
        "customer": customer,
        "product": product,
        "world": world_of([customer], {product: on_hand}),
    }


def dead_letters(engine: Engine, order_id: str) -> int:
    """Dead letters whose arguments name the order (a step's payload carries its id)."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(dead_letter_table)
                .where(cast(dead_letter_table.c.args, Text).contains(order_id))
            ).scalar_one()
        )


def place(api: Api, w: dict[str, Any], quantity: int = 1, key: str | None = None) -> str:
    headers = {"Idempotency-Key": key} if key else {}
    response = api.place(w["customer"], [(w["product"], quantity)], **headers)
    assert response.status_code == 202, response.text
    return str(response.json()["order_id"])


def place_through_a_crash(api: Api, w: dict[str, Any], key: str) -> str:
    """POST; the API dies answering it; the client retries with the same key."""
    with pytest.raises(httpx.TransportError):
        api.place(w["customer"], [(w["product"], 1)], **{"Idempotency-Key": key})
    retried = wait_for(
        "the retried POST to be answered", lambda: _try_place(api, w, key), timeout=20
    )
    return retried


def _try_place(api: Api, w: dict[str, Any], key: str) -> str | None:
    try:
        return place(api, w, key=key)
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("join", ["chord", "database"])
@pytest.mark.parametrize(
    "failpoint",
    ["step.before_commit", "step.after_commit", "complete.before_commit", "complete.after_commit"],
)
def test_a_worker_killed_inside_the_saga_loses_nothing(
    make_stack: StackFactory, engine: Engine, failpoint: str, join: str
) -> None:
    stack = make_stack(f"{failpoint}=kill*1", SAGA_JOIN=join)
    api, w = stack.client(), world(engine)
    order_id = place(api, w, 2)

    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    assert fired(stack, failpoint)
    require(settle(engine, w["world"]))


@pytest.mark.parametrize(
    "failpoints",
    [
        "api.after_commit=kill*1",
        "launch.after_publish=kill*1",
        "api.after_commit=kill*1,relay.after_publish=kill*1",
    ],
)
def test_an_api_killed_around_the_dispatch_loses_no_accepted_order(
    make_stack: StackFactory, engine: Engine, failpoints: str
) -> None:
    stack = make_stack(failpoints)
    api, w = stack.client(), world(engine)
    order_id = place_through_a_crash(api, w, key=f"crash-{failpoints}")

    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    for failpoint in failpoints.split(","):
        assert fired(stack, failpoint.split("=")[0])
    require(settle(engine, w["world"]))


def test_a_completion_failing_inside_a_step_goes_on_as_its_own_task(
    make_stack: StackFactory, engine: Engine
) -> None:
    """With the database join, a completion that fails in the step that ran it does not
    fail the step (no retry of the step, no dead letter). It fails twice here: deciding
    with the last step (the step then commits alone), then completing after the step;
    it is then sent as a task of its own, which confirms the order."""
    stack = make_stack("complete.before_commit=raise*2", SAGA_JOIN="database")
    api, w = stack.client(), world(engine)
    order_id = place(api, w, 2)

    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    assert fired(stack, "complete.before_commit")
    log = stack.logs(tail=10**7)
    assert "completion failed, sent on its own" in log
    assert "saga.order.complete[" in log  # the completion's own task ran
    assert dead_letters(engine, order_id) == 0
    require(settle(engine, w["world"]))


@pytest.mark.parametrize("join", ["chord", "database"])
def test_a_step_that_fails_for_good_cancels_and_compensates(
    make_stack: StackFactory, engine: Engine, join: str
) -> None:
    stack = make_stack("step.before_commit=raise*1", SAGA_JOIN=join)
    api, w = stack.client(), world(engine)
    order_id = place(api, w)

    final = api.wait_until_final(order_id)
    assert (final["status"], final["cancel_reason"]) == ("CANCELLED", "step_failed")
    require(settle(engine, w["world"]))


@pytest.mark.parametrize("join", ["chord", "database"])
def test_a_failed_compensation_is_shown_then_retried_until_it_is_done(
    make_stack: StackFactory, engine: Engine, join: str
) -> None:
    stack = make_stack("compensate.release=raise*1", SAGA_JOIN=join)
    api, w = stack.client(), world(engine, limit="5.00")  # the credit is refused
    order_id = place(api, w)

    final = api.wait_until_final(order_id)
    assert (final["status"], final["cancel_reason"]) == ("CANCELLED", "credit_limit_exceeded")
    assert fired(stack, "compensate.release")
    # Shown while it lasted (the retry may come before any poll sees it: the log keeps
    # it). With the database join the other step's completion may have taken the saga
    # first and compensated it: then the failure never stood, and nothing was shown.
    shown = ["OrderPlaced", "OrderCompensationFailed", "OrderCancelled"]
    events = events_of(engine, order_id)
    if join == "chord":
        assert events == shown
    else:
        assert events in (shown, ["OrderPlaced", "OrderCancelled"])
    assert api.order(order_id)["problem"] is None
    assert dead_letters(engine, order_id) == 0
    require(settle(engine, w["world"]))


def test_a_compensation_that_keeps_failing_is_left_to_an_operator_who_replays_it(
    make_stack: StackFactory, engine: Engine
) -> None:
    stack = make_stack("compensate.release=raise*2", COMPENSATION_MAX_ATTEMPTS="2")
    api, w = stack.client(), world(engine, limit="5.00")
    order_id = place(api, w)
    saga_id = _saga(engine, order_id)

    letter = wait_for(
        "the compensation to become a dead letter",
        lambda: _letter_of(engine, f"{saga_id}.compensation"),
        timeout=30,
    )
    assert (letter.kind, letter.attempts) == ("compensation_failed", 2)
    stuck = api.order(order_id)
    assert stuck["status"] == "COMPENSATION_FAILED" and "FailpointError" in stuck["problem"]

    from workers import dlq
    from workers.celery_app import create_celery

    app = create_celery(stack.settings, publisher=True)
    try:
        from orders.saga import DEFINITIONS

        dlq.replay(engine, app, [letter.id], DEFINITIONS)
    finally:
        app.close()
    final = api.wait_until_final(order_id)
    assert (final["status"], final["cancel_reason"]) == ("CANCELLED", "credit_limit_exceeded")
    require(settle(engine, w["world"]))


def events_of(engine: Engine, order_id: str) -> list[str]:
    from orders.tables import order_events

    with engine.connect() as conn:
        return list(
            conn.execute(
                select(order_events.c.type)
                .where(cast(order_events.c.order_id, Text) == order_id)
                .order_by(order_events.c.seq)
            ).scalars()
        )


def _letter_of(engine: Engine, task_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            select(dead_letter_table).where(dead_letter_table.c.task_id == task_id)
        ).first()


def test_a_pool_child_killed_mid_step_has_its_message_redelivered(
    make_stack: StackFactory, engine: Engine
) -> None:
    stack = make_stack(SAGA_STEP_DELAY_SECONDS="1.5", SAGA_DEADLINE_SECONDS="30")
    api, w = stack.client(), world(engine)
    worker = stack.service("worker")
    order_id = place(api, w)
    wait_for(
        "both steps to start",
        lambda: worker.log().count(f"{_saga(engine, order_id)}.reserve") >= 2,
        timeout=10,
    )
    for child in worker.children():
        os.kill(child, signal.SIGKILL)

    assert api.wait_until_final(order_id)["status"] == "CONFIRMED"
    assert "WorkerLostError" in worker.log()
    require(settle(engine, w["world"]))


def test_a_whole_worker_killed_mid_saga_is_recovered_after_a_restart(
    make_stack: StackFactory, engine: Engine
) -> None:
    stack = make_stack(SAGA_STEP_DELAY_SECONDS="1.5")
    api, w = stack.client(), world(engine)
    worker = stack.service("worker")
    order_id = place(api, w)
    wait_for("a step to start", lambda: f"{_saga(engine, order_id)}.reserve" in worker.log())
    worker.kill()
    time.sleep(0.5)  # the node stays down a moment, as after a real crash
    worker.start()

    assert api.wait_until_final(order_id, timeout=40)["status"] == "CONFIRMED"
    require(settle(engine, w["world"]))


def test_redis_restarted_empty_mid_saga_costs_time_not_orders(
    make_stack: StackFactory, engine: Engine, servers: Servers, tmp_path: Path
) -> None:
    redis = LocalRedis(servers.base / f"redis-{tmp_path.name}", password="crash-test")
    redis.start()
    try:
        stack = make_stack(redis=redis, SAGA_STEP_DELAY_SECONDS="1.5")
        api, w = stack.client(), world(engine)
        worker = stack.service("worker")
        order_ids = [place(api, w) for _ in range(3)]
        wait_for("steps to start", lambda: ".reserve_" in worker.log())
        # Queued messages, the chord's join and the unacknowledged messages are all gone;
        # Redis stays down while the running steps finish (their acks cannot be sent).
        redis.stop(signal.SIGKILL)
        time.sleep(2.5)
        redis.start()

        finals = [api.wait_until_final(order_id, timeout=40)["status"] for order_id in order_ids]
        assert finals == ["CONFIRMED"] * 3
        require(settle(engine, w["world"]))
        assert worker.process is not None and worker.process.poll() is None, "the worker died"
        assert "Unrecoverable error" not in worker.log()
    finally:
        redis.stop()


def _saga(engine: Engine, order_id: str) -> str:
    from uuid import UUID

    from sqlalchemy import select

    from orders.tables import orders

    with engine.connect() as conn:
        return str(
            conn.execute(select(orders.c.saga_id).where(orders.c.id == UUID(order_id))).scalar_one()
        )
