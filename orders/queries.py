"""The read side in PostgreSQL: an order with its lines, statuses, a customer's orders and
summary. Each function issues a fixed number of queries, whatever the number of orders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, Uuid, bindparam, func, select, tuple_
from sqlalchemy.dialects.postgresql import ARRAY

from orders.tables import customer_order_summaries, customers, order_lines, orders

_o = orders.c
_STATUSES = select(
    _o.id, _o.status, _o.cancel_reason, _o.updated_at, _o.version, _o.customer_id
).where(_o.id == func.any(bindparam("ids", type_=ARRAY(Uuid))))


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
    #: The order's last event seq.
    version: int = 0
    #: Whose order it is (a key sees only its customers' orders).
    customer_id: str = ""

    def to_json(self) -> dict[str, Any]:
        """The status as JSON primitives (also its cached form)."""
        return {
            "order_id": str(self.order_id),
            "customer_id": self.customer_id,
            "status": self.status,
            "cancel_reason": self.cancel_reason,
            "updated_at": self.updated_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], version: int) -> StatusView:
        """A status from its JSON form."""
        return cls(
            UUID(data["order_id"]),
            data["status"],
            data["cancel_reason"],
            datetime.fromisoformat(data["updated_at"]),
            version,
            data.get("customer_id", ""),
        )


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
    version: int = 0

    def to_json(self) -> dict[str, Any]:
        """The order as JSON primitives (also its cached form); money as strings."""
        return {
            "order_id": str(self.order_id),
            "customer_id": self.customer_id,
            "status": self.status,
            "cancel_reason": self.cancel_reason,
            "problem": self.problem,
            "total": str(self.total),
            "lines": [
                {
                    "product_id": line.product_id,
                    "quantity": line.quantity,
                    "unit_price": str(line.unit_price),
                }
                for line in self.lines
            ],
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], version: int) -> OrderView:
        """An order from its JSON form."""
        return cls(
            order_id=UUID(data["order_id"]),
            customer_id=data["customer_id"],
            status=data["status"],
            cancel_reason=data["cancel_reason"],
            problem=data["problem"],
            total=Decimal(data["total"]),
            lines=tuple(
                LineView(ln["product_id"], ln["quantity"], Decimal(ln["unit_price"]))
                for ln in data["lines"]
            ),
            created_at=datetime.fromisoformat(data["created_at"]),
            updated_at=datetime.fromisoformat(data["updated_at"]),
            version=version,
        )


def get_status(engine: Engine, order_id: UUID) -> StatusView | None:
    """The order's status, or None if there is no such order."""
    return get_statuses(engine, [order_id]).get(order_id)


def get_statuses(engine: Engine, order_ids: Sequence[UUID]) -> dict[UUID, StatusView]:
    """The statuses of these orders (one query); unknown orders left out."""
    if not order_ids:
        return {}
    with engine.connect() as conn:
        rows = conn.execute(_STATUSES, {"ids": list(order_ids)}).all()
    return {row.id: StatusView(*row) for row in rows}


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
                orders.c.version,
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
        version=first.version,
    )


@dataclass(frozen=True)
class OrderPage:
    """A page of a customer's orders, newest first, and where the next page starts."""

    orders: tuple[OrderView, ...]
    #: (created_at, order id) of the last order when there may be more.
    next_after: tuple[datetime, UUID] | None


def customer_orders(
    engine: Engine, customer_id: str, limit: int, after: tuple[datetime, UUID] | None = None
) -> OrderPage | None:
    """A customer's orders with their lines, newest first, ``limit`` at most, older than
    ``after``: two queries for any page size. None for an unknown customer."""
    page = (
        select(
            _o.id,
            _o.customer_id,
            _o.status,
            _o.cancel_reason,
            _o.problem,
            _o.total,
            _o.created_at,
            _o.updated_at,
            _o.version,
        )
        .where(_o.customer_id == customer_id)
        .order_by(_o.created_at.desc(), _o.id.desc())
        .limit(limit + 1)
    )
    if after is not None:
        page = page.where(tuple_(_o.created_at, _o.id) < tuple_(*after))
    with engine.connect() as conn:
        rows = conn.execute(page).all()
        known = (
            bool(rows)
            or conn.execute(select(customers.c.id).where(customers.c.id == customer_id)).first()
            is not None
        )
        if not known:
            return None
        more = len(rows) > limit
        rows = rows[:limit]
        lines: dict[UUID, list[LineView]] = {row.id: [] for row in rows}
        if rows:
            for line in conn.execute(
                select(
                    order_lines.c.order_id,
                    order_lines.c.product_id,
                    order_lines.c.quantity,
                    order_lines.c.unit_price,
                )
                .where(order_lines.c.order_id.in_(list(lines)))
                .order_by(order_lines.c.order_id, order_lines.c.line_no)
            ):
                lines[line.order_id].append(
                    LineView(line.product_id, line.quantity, line.unit_price)
                )
    views = tuple(
        OrderView(
            order_id=row.id,
            customer_id=row.customer_id,
            status=row.status,
            cancel_reason=row.cancel_reason,
            problem=row.problem,
            total=row.total,
            lines=tuple(lines[row.id]),
            created_at=row.created_at,
            updated_at=row.updated_at,
            version=row.version,
        )
        for row in rows
    )
    return OrderPage(views, (views[-1].created_at, views[-1].order_id) if more and views else None)


@dataclass(frozen=True)
class CustomerSummary:
    """A customer's orders at a glance (the read model kept from the order events)."""

    customer_id: str
    orders_placed: int
    orders_confirmed: int
    orders_cancelled: int
    placed_total: Decimal
    confirmed_total: Decimal
    last_order_at: datetime | None
    orders_refunded: int = 0
    refunded_total: Decimal = Decimal(0)


def customer_summary(engine: Engine, customer_id: str) -> CustomerSummary | None:
    """The customer's summary (zeros before the first order); None for an unknown one."""
    s = customer_order_summaries.c
    with engine.connect() as conn:
        row = conn.execute(
            select(
                customers.c.id,
                func.coalesce(s.orders_placed, 0),
                func.coalesce(s.orders_confirmed, 0),
                func.coalesce(s.orders_cancelled, 0),
                func.coalesce(s.placed_total, 0),
                func.coalesce(s.confirmed_total, 0),
                s.last_order_at,
                func.coalesce(s.orders_refunded, 0),
                func.coalesce(s.refunded_total, 0),
            )
            .select_from(customers.outerjoin(customer_order_summaries))
            .where(customers.c.id == customer_id)
        ).first()
    return None if row is None else CustomerSummary(*row)
