"""A small client of the API, as a user's program would call it."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import API_KEY
from tests.helpers import wait_for

TERMINAL = ("CONFIRMED", "CANCELLED")


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

    def close(self) -> None:
        """Close the connections."""
        self.http.close()
