"""Reading an order's saga payload (primitives only) back into typed values."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any


def lines_of(payload: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The order's (product id, quantity) lines."""
    return [(str(product_id), int(quantity)) for product_id, quantity in payload["lines"]]


def customer_of(payload: Mapping[str, Any]) -> str:
    """The order's customer."""
    return str(payload["customer_id"])


def amount_of(payload: Mapping[str, Any]) -> Decimal:
    """The order's amount."""
    return Decimal(payload["amount"])
