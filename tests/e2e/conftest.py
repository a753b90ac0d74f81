"""The real processes for end-to-end tests, and an HTTP client for the API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from config.settings import Settings
from tests.conftest import API_KEY, Servers
from tests.harness.processes import Stack
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

TERMINAL = ("CONFIRMED", "CANCELLED")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the stack's process logs to a failing end-to-end test's report."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack, Stack):
        report.sections.append(("process logs", stack.logs()))
    return report


@pytest.fixture(scope="session")
def stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    """gunicorn serving the API and a prefork saga worker, for the e2e session."""
    stack = Stack(settings, servers.base / "e2e")
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


class Api:
    """A small client of the API, as a user's program would call it."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(
            base_url=base_url, timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}
        )

    def place(self, customer: str, lines: list[tuple[str, int]], **headers: str) -> httpx.Response:
        """POST /orders."""
        body = {
            "customer_id": customer,
            "lines": [{"product_id": p, "quantity": q} for p, q in lines],
        }
        return self.http.post("/orders", json=body, headers=headers)

    def status(self, order_id: str) -> dict[str, Any]:
        """GET /orders/<id>/status."""
        response = self.http.get(f"/orders/{order_id}/status")
        response.raise_for_status()
        return dict(response.json())

    def order(self, order_id: str) -> dict[str, Any]:
        """GET /orders/<id>."""
        response = self.http.get(f"/orders/{order_id}")
        response.raise_for_status()
        return dict(response.json())

    def wait_until_final(self, order_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll the status until the order is confirmed or cancelled."""
        return wait_for(
            f"order {order_id} to be final",
            lambda: (s := self.status(order_id))["status"] in TERMINAL and s,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def api(stack: Stack) -> Iterator[Api]:
    client = Api(stack.api_url)
    yield client
    client.http.close()
