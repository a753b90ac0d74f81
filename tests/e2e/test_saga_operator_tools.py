"""The operators' saga tools through the real processes: the API (gunicorn) and the
command line (``python -m workers.sagas``, run with the system's environment), a real
saga worker running what they dispatch. Stuck sagas listed first, one shown in full, a
saga whose messages were lost retried to its end, a running saga cancelled with its
stock and credit released, a failed compensation run again, and the dead-letter refusal
of a step whose saga was decided meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, Engine, select, update

from config import names
from config.settings import Settings
from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from orders.tables import orders
from sagas import runner
from sagas.tables import sagas
from tests.conftest import ADMIN_KEY, API_KEY, ROOT
from tests.fakes import RecordingLauncher
from tests.harness.processes import Stack, process_env
from tests.helpers import Stock, add_customer, add_product, credit_of, stock_of, wait_for
from workers import dlq
from workers.tables import dead_letters

pytestmark = pytest.mark.e2e

OPERATOR = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROBLEM = "application/problem+json"


class FailingRelease(OrderSaga):
    """The order saga whose compensation fails (a store that is down)."""

    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        raise RuntimeError("stock service unavailable")


def staged(engine: Engine, *, limit: str = "100.00") -> dict[str, Any]:
    """An accepted order of 2 units whose saga was recorded but never published (its
    messages lost)."""
    customer, product = add_customer(engine, limit=limit), add_product(engine, on_hand=5)
    launcher = RecordingLauncher()
    accepted = services.place_order(
        engine, PlaceOrder(customer, (OrderLine(product, 2),), client="tests"), launcher
    )
    (start,) = launcher.launched
    return {
        "customer": customer,
        "product": product,
        "order_id": accepted.order_id,
        "saga_id": start.saga_id,
        "payload": start.payload,
    }


def steps_run(engine: Engine, order: dict[str, Any], saga: OrderSaga | None = None) -> None:
    for step in (RESERVE_STOCK, RESERVE_CREDIT):
        runner.run_step(engine, saga or OrderSaga(), order["saga_id"], step, order["payload"])


def order_status(engine: Engine, order_id: uuid.UUID) -> tuple[str, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            select(orders.c.status, orders.c.cancel_reason).where(orders.c.id == order_id)
        ).one()
    return row.status, row.cancel_reason


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """A tool run as an operator runs it, with the system's environment."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=process_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_api_lists_stuck_sagas_first_and_shows_one_in_full(
    stack: Stack, engine: Engine
) -> None:
    lost = staged(engine)
    with engine.begin() as conn:
        conn.execute(
            update(sagas)
            .where(sagas.c.id == lost["saga_id"])
            .values(deadline_at=datetime.now(UTC) - timedelta(minutes=5))
        )
    client_key = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{stack.api_url}/admin/sagas", headers=client_key).status_code == 403

    listed = httpx.get(
        f"{stack.api_url}/admin/sagas",
        params={"state": ["running", "COMPENSATION_FAILED"], "limit": 1000},
        headers=OPERATOR,
    )
    assert listed.status_code == 200, listed.text
    rows = listed.json()["sagas"]
    stuck = [row["stuck"] for row in rows]
    assert stuck == sorted(stuck, reverse=True)  # every stuck saga before the others
    mine = next(row for row in rows if row["id"] == str(lost["saga_id"]))
    assert mine["stuck"] and mine["steps"] == {RESERVE_STOCK: "PENDING", RESERVE_CREDIT: "PENDING"}

    shown = httpx.get(f"{stack.api_url}/admin/sagas/{lost['saga_id']}", headers=OPERATOR)
    assert shown.status_code == 200, shown.text
    assert (shown.json()["state"], shown.json()["ledger"]) == ("RUNNING", [])
    assert shown.json()["timeline"][0]["event"] == "accepted"
    missing = httpx.get(f"{stack.api_url}/admin/sagas/{uuid.uuid4()}", headers=OPERATOR)
    assert (missing.status_code, missing.headers["Content-Type"]) == (404, PROBLEM)


def test_the_api_retries_cancels_and_retries_a_compensation(stack: Stack, engine: Engine) -> None:
    # A saga whose messages were lost: retried, the worker runs it to its end.
    lost = staged(engine)
    retried = httpx.post(f"{stack.api_url}/admin/sagas/{lost['saga_id']}/retry", headers=OPERATOR)
    assert retried.status_code == 202, retried.text
    assert retried.json()["outcome"] == "redriven"
    wait_for(
        "the retried saga to confirm",
        lambda: order_status(engine, lost["order_id"])[0] == "CONFIRMED",
    )

    # A running saga (both reserved, its completion lost): cancelled, everything back.
    running = staged(engine)
    steps_run(engine, running)
    assert stock_of(engine, running["product"]) == Stock(5, 2)
    cancelled = httpx.post(
        f"{stack.api_url}/admin/sagas/{running['saga_id']}/cancel", headers=OPERATOR
    )
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["state"], cancelled.json()["reason"]) == (
        "CANCELLED",
        "operator_cancelled",
    )
    assert order_status(engine, running["order_id"]) == ("CANCELLED", "operator_cancelled")
    assert stock_of(engine, running["product"]) == Stock(5, 0)
    assert credit_of(engine, running["customer"]).reserved == 0
    again = httpx.post(f"{stack.api_url}/admin/sagas/{running['saga_id']}/cancel", headers=OPERATOR)
    assert (again.status_code, again.headers["Content-Type"]) == (409, PROBLEM)
    assert "CANCELLED (operator_cancelled)" in again.json()["detail"]

    # A compensation that failed, the cause mended: run again, the order ends CANCELLED.
    failed = staged(engine, limit="5.00")
    steps_run(engine, failed)
    runner.complete(engine, FailingRelease(), failed["saga_id"], retry_after=lambda n: None)
    mended = httpx.post(
        f"{stack.api_url}/admin/sagas/{failed['saga_id']}/retry-compensation", headers=OPERATOR
    )
    assert mended.status_code == 200, mended.text
    assert (mended.json()["outcome"], mended.json()["compensated"]) == (
        "CANCELLED",
        [RESERVE_STOCK],
    )
    assert order_status(engine, failed["order_id"]) == ("CANCELLED", "credit_limit_exceeded")
    assert stock_of(engine, failed["product"]) == Stock(5, 0)


def test_the_command_line_lists_shows_and_acts_with_its_exit_statuses(
    stack: Stack, settings: Settings, engine: Engine
) -> None:
    lost, running, failed = staged(engine), staged(engine), staged(engine, limit="5.00")
    steps_run(engine, running)
    steps_run(engine, failed)
    runner.complete(engine, FailingRelease(), failed["saga_id"], retry_after=lambda n: None)

    listed = cli(settings, "workers.sagas", "list", "--state", "compensation_failed")
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    assert header.split()[:3] == ["SAGA", "NAME", "STATE"]
    assert any(str(failed["saga_id"]) in line and line.startswith("!") for line in lines)

    shown = cli(settings, "workers.sagas", "show", str(running["saga_id"]), "--json")
    assert shown.returncode == 0, shown.stderr
    assert {step["status"] for step in json.loads(shown.stdout)["ledger"]} == {"APPLIED"}

    retried = cli(settings, "workers.sagas", "retry", str(lost["saga_id"]))
    assert retried.returncode == 0, retried.stderr
    assert "redriven" in retried.stdout
    wait_for("the retried saga", lambda: order_status(engine, lost["order_id"])[0] == "CONFIRMED")

    cancelled = cli(settings, "workers.sagas", "cancel", str(running["saga_id"]), "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["reason"] == "operator_cancelled"
    assert stock_of(engine, running["product"]) == Stock(5, 0)

    mended = cli(settings, "workers.sagas", "retry-compensation", str(failed["saga_id"]))
    assert mended.returncode == 0, mended.stderr
    assert "-> CANCELLED" in mended.stdout

    refused = cli(settings, "workers.sagas", "cancel", str(failed["saga_id"]))
    assert refused.returncode == 1
    assert "is CANCELLED (credit_limit_exceeded)" in refused.stderr
    unknown = cli(settings, "workers.sagas", "show", str(uuid.uuid4()))
    assert (unknown.returncode, unknown.stderr.startswith("error: no saga")) == (2, True)


def test_replaying_a_step_of_a_saga_decided_meanwhile_says_why_and_what_to_do(
    stack: Stack, settings: Settings, engine: Engine
) -> None:
    order = staged(engine)
    saga_id = order["saga_id"]
    runner.abort_step(engine, saga_id, RESERVE_STOCK, "poison_message")
    runner.run_step(engine, OrderSaga(), saga_id, RESERVE_CREDIT, order["payload"])
    runner.complete(engine, OrderSaga(), saga_id, retry_after=lambda n: None)
    dlq.record(
        engine,
        task_id=f"{saga_id}.{RESERVE_STOCK}",
        task_name=names.RESERVE_STOCK,
        kind=dlq.POISON,
        error="the message crashed its worker",
        args=[str(saga_id), order["payload"]],
        kwargs={},
        queue=names.SAGA_QUEUE,
    )
    with engine.connect() as conn:
        letter = conn.execute(
            select(dead_letters.c.id).where(dead_letters.c.task_id == f"{saga_id}.{RESERVE_STOCK}")
        ).scalar_one()

    answer = httpx.post(f"{stack.api_url}/admin/dead-letters/{letter}/replay", headers=OPERATOR)
    assert (answer.status_code, answer.headers["Content-Type"]) == (409, PROBLEM)
    detail = answer.json()["detail"]
    assert f"saga {saga_id} (order) was CANCELLED (poison_message) at " in detail
    assert "step reserve_stock was recorded ABORTED (poison_message)" in detail
    assert "its effect never took place" in detail
    assert f"`python -m workers.dlq purge {letter}`" in detail
    assert "to retry the order, place it again" in detail

    replayed = cli(settings, "workers.dlq", "replay", str(letter))
    assert replayed.returncode == 1
    assert detail in replayed.stderr
    assert cli(settings, "workers.dlq", "purge", str(letter)).stdout.strip() == "1 purged"
