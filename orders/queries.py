"""The read side: an order with its lines, an order's status."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from sqlalchemy import Engine, select

from orders.tables import order_lines, orders


@dataclass(frozen=True)
class LineView:
    """One line of an order as read back."""

    product_id: str
    quantity: int
    unit_price: Decimal


@dataclass(frozen=True)
class StatusView:
    """An order's status, and why it was cancelled if it was."""

    order_id: UUID
    status: str
    cancel_reason: str | None
    updated_at: datetime


@dataclass(frozen=True)
class OrderView:
    """An order with its lines."""

    order_id: UUID
    customer_id: str
    status: str
    cancel_reason: str | None
    #: What went wrong while the order is COMPENSATION_FAILED.
    problem: str | None
    total: Decimal
    lines: tuple[LineView, ...]
    created_at: datetime
    updated_at: datetime


def get_status(engine: Engine, order_id: UUID) -> StatusView | None:
    """The order's status, or None if there is no such order."""
    with engine.connect() as conn:
        row = conn.execute(
            select(orders.c.status, orders.c.cancel_reason, orders.c.updated_at).where(
                orders.c.id == order_id
            )
        ).first()
    if row is None:
        return None
    return StatusView(order_id, row.status, row.cancel_reason, row.updated_at)


def get_order(engine: Engine, order_id: UUID) -> OrderView | None:
    """The order with its lines (one query), or None if there is no such order."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                orders.c.customer_id,
                orders.c.status,
                orders.c.cancel_reason,
                orders.c.problem,
                orders.c.total,
                orders.c.created_at,
                orders.c.updated_at,
                order_lines.c.product_id,
                order_lines.c.quantity,
                order_lines.c.unit_price,
            )
            .join(order_lines, order_lines.c.order_id == orders.c.id)
            .where(orders.c.id == order_id)
            .order_by(order_lines.c.line_no)
        ).all()
    if not rows:
        return None
    first = rows[0]
    return OrderView(
        order_id=order_id,
        customer_id=first.customer_id,
        status=first.status,
        cancel_reason=first.cancel_reason,
        problem=first.problem,
        total=first.total,
        lines=tuple(LineView(r.product_id, r.quantity, r.unit_price) for r in rows),
        created_at=first.created_at,
        updated_at=first.updated_at,
    )
