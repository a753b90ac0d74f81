"""The saga's two reservations run at the same time, on two worker processes."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from uuid import UUID

import pytest
from sqlalchemy import Engine, select

from config.settings import Settings
from orders.tables import orders
from sagas.tables import saga_steps
from tests.conftest import Servers
from tests.harness.client import Api
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product

pytestmark = pytest.mark.e2e

#: Each step sleeps this long first (a test-only setting), so overlap is unmistakable.
STEP_DELAY = 1.0


@pytest.fixture(scope="module")
def slow_api(settings: Settings, servers: Servers) -> Iterator[Api]:
    # Its own broker database: this worker and the session's never share a queue.
    slow = replace(
        settings, broker_url=servers.redis.url(4), result_backend_url=servers.redis.url(5)
    )
    stack = Stack(
        slow, servers.base / "e2e-slow", extra_env={"SAGA_STEP_DELAY_SECONDS": str(STEP_DELAY)}
    )
    try:
        stack.start()
        yield stack.client()
    finally:
        stack.stop()


def test_stock_and_credit_are_reserved_in_parallel(slow_api: Api, engine: Engine) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=5)
    order_id = slow_api.place(customer, [(product, 1)]).json()["order_id"]
    assert slow_api.wait_until_final(order_id)["status"] == "CONFIRMED"

    with engine.connect() as conn:
        saga_id = conn.execute(
            select(orders.c.saga_id).where(orders.c.id == UUID(order_id))
        ).scalar_one()
        steps = {
            row.step: row
            for row in conn.execute(
                select(saga_steps.c.step, saga_steps.c.started_at, saga_steps.c.finished_at).where(
                    saga_steps.c.saga_id == saga_id
                )
            )
        }
    stock, credit = steps["reserve_stock"], steps["reserve_credit"]
    # Each step took at least the delay, and each started before the other finished.
    for step in (stock, credit):
        assert (step.finished_at - step.started_at).total_seconds() >= STEP_DELAY
    assert stock.started_at < credit.finished_at
    assert credit.started_at < stock.finished_at


def test_the_timeline_page_draws_the_two_reservations_side_by_side(
    slow_api: Api, engine: Engine, tmp_path: Path
) -> None:
    customer = add_customer(engine, limit="100.00")
    product = add_product(engine, on_hand=5)
    order_id = slow_api.place(customer, [(product, 1)]).json()["order_id"]
    slow_api.wait_until_final(order_id)

    timeline = slow_api.http.get(f"/orders/{order_id}/timeline").json()
    assert [s["step"] for s in timeline["steps"]] != []
    page = slow_api.http.get(f"/orders/{order_id}/timeline.html")
    assert page.status_code == 200
    saved = tmp_path / "timeline.html"
    saved.write_text(page.text)

    # What a person sees: the page rendered by a real browser.
    dom = chromium(tmp_path, "--dump-dom", saved)
    drawn = {
        match["step"]: (float(match["start"]), float(match["end"]))
        for match in re.finditer(
            r'data-step="(?P<step>[^"]+)" data-start-ms="(?P<start>[\d.]+)" '
            r'data-end-ms="(?P<end>[\d.]+)"',
            dom,
        )
    }
    assert set(drawn) >= {"reserve_stock", "reserve_credit", "decision"}
    (stock_start, stock_end), (credit_start, credit_end) = (
        drawn["reserve_stock"],
        drawn["reserve_credit"],
    )
    assert stock_start < credit_end and credit_start < stock_end  # side by side
    screenshot = tmp_path / "timeline.png"
    chromium(tmp_path, f"--screenshot={screenshot}", saved)
    assert screenshot.stat().st_size > 5_000


def chromium(profile: Path, action: str, page: Path) -> str:
    """Run headless Chromium (Debian's package) on a local page."""
    result = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile / 'chromium-profile'}",
            "--window-size=1200,420",
            action,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout
