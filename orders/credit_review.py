"""The credit review: re-evaluate customers' exposure and check their figures.

For each customer: used + reserved against the limit (a limit lowered below what a
customer uses makes them over it), credit used against their confirmed orders, credit
reserved against their open orders. The review is one read (one snapshot, so the
figures and the orders agree in time) and one write of each customer's latest review.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, String, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from orders.domain import OrderStatus
from orders.tables import Total, credit_reviews, customers, orders

_c, _o = customers.c, orders.c
_confirmed = (
    select(func.sum(_o.total))
    .where(_o.customer_id == _c.id, _o.status == OrderStatus.CONFIRMED.value)
    .scalar_subquery()
)
_open = (
    select(func.sum(_o.total))
    .where(_o.customer_id == _c.id)
    .where(_o.status.in_([OrderStatus.PENDING.value, OrderStatus.COMPENSATION_FAILED.value]))
    .scalar_subquery()
)
_READ = (
    select(
        _c.id,
        _c.credit_limit,
        _c.credit_used,
        _c.credit_reserved,
        func.coalesce(_confirmed, 0).cast(Total).label("confirmed"),
        func.coalesce(_open, 0).cast(Total).label("open"),
    )
    .where(_c.id == func.any(bindparam("ids", type_=ARRAY(String))))
    .order_by(_c.id)
)


@dataclass(frozen=True)
class Review:
    """One customer's review."""

    customer_id: str
    available: Decimal
    over_limit: bool
    findings: tuple[str, ...]

    @property
    def inconsistent(self) -> bool:
        """Whether the figures disagree with the orders."""
        return bool(self.findings)

    @property
    def flagged(self) -> bool:
        """Whether someone should look at this customer."""
        return self.over_limit or self.inconsistent


def evaluate(row: Any) -> Review:
    """Review one customer's figures (pure)."""
    limit, used, reserved = row.credit_limit, row.credit_used, row.credit_reserved
    findings = []
    if used != row.confirmed:
        findings.append(f"credit used {used} but confirmed orders total {row.confirmed}")
    if reserved > row.open:
        findings.append(f"credit reserved {reserved} but open orders total only {row.open}")
    return Review(row.id, limit - used - reserved, used + reserved > limit, tuple(findings))


def review_customers(
    conn: Connection, customer_ids: Sequence[str], run_id: UUID, now: datetime
) -> list[Review]:
    """Review these customers and keep each one's latest review; return the reviews."""
    rows = conn.execute(_READ, {"ids": list(customer_ids)}).all()
    reviews = [evaluate(row) for row in rows]
    if not rows:
        return reviews
    values = [
        {
            "customer_id": row.id,
            "run_id": run_id,
            "credit_limit": row.credit_limit,
            "credit_used": row.credit_used,
            "credit_reserved": row.credit_reserved,
            "available": review.available,
            "over_limit": review.over_limit,
            "inconsistent": review.inconsistent,
            "findings": list(review.findings),
            "reviewed_at": now,
        }
        for row, review in zip(rows, reviews, strict=True)
    ]
    upsert = pg_insert(credit_reviews).values(values)
    conn.execute(
        upsert.on_conflict_do_update(
            index_elements=[credit_reviews.c.customer_id],
            set_={name: upsert.excluded[name] for name in values[0] if name != "customer_id"},
        )
    )
    return reviews
