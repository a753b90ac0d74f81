"""What the order's sagas (the order saga, the refund saga) share: reading their payload
(primitives only) back into typed values, and the credit cache's write-through."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import Connection

from config.database import after_commit
from orders.credit import CreditFigures


class CreditWriteThrough:
    """Tells ``on_credit`` a customer's new credit figures once a change of them commits
    (a reservation, its release, its use, its return): the credit cache's write-through."""

    def __init__(self, on_credit: Callable[[CreditFigures], None] | None = None) -> None:
        self.on_credit = on_credit

    def _credit_changed(self, conn: Connection, figures: CreditFigures) -> None:
        if self.on_credit is not None:
            after_commit(conn, partial(self.on_credit, figures))


def lines_of(payload: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The order's (product id, quantity) lines."""
    return [(str(product_id), int(quantity)) for product_id, quantity in payload["lines"]]


def customer_of(payload: Mapping[str, Any]) -> str:
    """The order's customer."""
    return str(payload["customer_id"])


def amount_of(payload: Mapping[str, Any]) -> Decimal:
    """The order's amount."""
    return Decimal(payload["amount"])
