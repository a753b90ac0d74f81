"""The credit review: re-evaluate customers' exposure and check their figures.

For each customer: used + reserved against the limit (a limit lowered below what a
customer uses makes them over it), credit used against their confirmed orders, credit
reserved against their open orders. The review is one read (one snapshot, so the
figures and the orders agree in time) and one write of each customer's latest review.

The review costs what changed since the customer's last review, not their history.
Each review keeps a checkpoint (``credit_reviews.checkpoint_total``, ``checkpoint_at``):
the amount of the customer's orders confirmed before ``checkpoint_at`` less those of
them refunded before it. The next review reads only the orders changed since (the index
on ``orders(customer_id, updated_at)``): it adds the orders confirmed since
(``confirmed_at``) and takes off the ones refunded since (a REFUNDED order is final, its
``updated_at`` is its refund), and compares that with ``credit_used``: a ``credit_used``
changed by hand is still found, on every review. An order confirmed before the
checkpoint and refunded since is inside the checkpoint's sum and taken off now; one
confirmed and refunded since counts nothing; an order that changed since without
changing what it holds (a cancel request that became a refund) counts nothing either.

The review then moves the checkpoint to ``MARGIN`` before its own time, never back: an
order is stamped (``confirmed_at``, ``updated_at``) in the transaction that confirms or
refunds it, which may commit a while later; one stamped within the margin before a
review and committed after it is still ahead of the checkpoint, so the next review
counts it (and counts it once). A transaction that commits more than ``MARGIN`` after
its stamp would be missed until a full review. A customer without a checkpoint (their
first review, or after ``clear_checkpoints``: ``python -m workers.batch start --full``)
has every order summed.

A refund returns the credit in one of its steps and marks the order REFUNDED when it
completes: a review that reads a customer in between (milliseconds) finds credit used
below the confirmed orders, and the next review finds them agreeing again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import (
    Connection,
    DateTime,
    String,
    bindparam,
    func,
    literal_column,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from orders.domain import OrderStatus
from orders.tables import Total, credit_reviews, customers, orders

#: How long before a review its checkpoint is cut: longer than any transaction that
#: confirms an order may take between stamping it and committing, clocks apart included.
MARGIN = timedelta(hours=1)

_c, _o, _v = customers.c, orders.c, credit_reviews.c
_ids = bindparam("ids", type_=ARRAY(String))
#: Where the customer's checkpoint is cut now: never before where it was.
_cut = func.greatest(_v.checkpoint_at, bindparam("cut", type_=DateTime(timezone=True)))
#: The checkpoint (the beginning of time without one).
_checkpoint = func.coalesce(_v.checkpoint_at, literal_column("'-infinity'::timestamptz"))
#: When an order was confirmed (one confirmed by a worker older than confirmed_at: the
#: last time it changed, which for a CONFIRMED order is its confirmation).
_confirmed_at = func.coalesce(_o.confirmed_at, _o.updated_at)
_refunded = _o.status == OrderStatus.REFUNDED.value


def _sum(condition: Any) -> Any:
    return func.coalesce(func.sum(_o.total).filter(condition), 0)


#: The customer's orders confirmed or refunded since the checkpoint (a REFUNDED order is
#: final: its updated_at is its refund), found among the orders changed since: the ones
#: confirmed since count, the ones refunded since are taken off (confirmed before the
#: checkpoint, they were in its sum; confirmed since, they cancel out). The same up to
#: the new cut makes the new checkpoint.
_since = (
    select(
        (_sum(_confirmed_at >= _checkpoint) - _sum(_refunded)).label("total"),
        (
            _sum((_confirmed_at >= _checkpoint) & (_confirmed_at < _cut))
            - _sum(_refunded & (_o.updated_at < _cut))
        ).label("settled"),
    )
    .where(_o.customer_id == _c.id)
    .where(_o.status.in_([OrderStatus.CONFIRMED.value, OrderStatus.REFUNDED.value]))
    .where(_o.updated_at >= _checkpoint)
    .lateral("since")
)
_open = (
    select(func.sum(_o.total))
    .where(_o.customer_id == _c.id)
    .where(_o.status.in_([OrderStatus.PENDING.value, OrderStatus.COMPENSATION_FAILED.value]))
    .scalar_subquery()
)
_base = func.coalesce(_v.checkpoint_total, 0)
_READ = (
    select(
        _c.id,
        _c.credit_limit,
        _c.credit_used,
        _c.credit_reserved,
        (_base + _since.c.total).cast(Total).label("confirmed"),
        func.coalesce(_open, 0).cast(Total).label("open"),
        _cut.label("checkpoint_at"),
        (_base + _since.c.settled).cast(Total).label("checkpoint_total"),
    )
    .select_from(customers.outerjoin(credit_reviews, _v.customer_id == _c.id).join(_since, true()))
    .where(_c.id == func.any(_ids))
    .order_by(_c.id)
)
_NO_JIT = text("SET LOCAL jit = off")
#: The chunk's earlier reviews, locked in id order: a review and ``clear_checkpoints``
#: (or another review of the same customer) take turns on a checkpoint.
_LOCK = (
    select(_v.customer_id)
    .where(_v.customer_id == func.any(_ids))
    .order_by(_v.customer_id)
    .with_for_update()
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
    conn: Connection,
    customer_ids: Sequence[str],
    run_id: UUID,
    now: datetime,
    *,
    margin: timedelta = MARGIN,
) -> list[Review]:
    """Review these customers and keep each one's latest review and checkpoint (cut
    ``margin`` before ``now``); return the reviews."""
    ids = list(customer_ids)
    # The planner cannot know how few orders changed since each checkpoint (a bound from
    # another table): it guesses a third of the customer's, past the cost at which
    # PostgreSQL compiles the query (JIT), which then takes longer than the read itself.
    conn.execute(_NO_JIT)
    conn.execute(_LOCK, {"ids": ids})
    rows = conn.execute(_READ, {"ids": ids, "cut": now - margin}).all()
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
            "checkpoint_at": row.checkpoint_at,
            "checkpoint_total": row.checkpoint_total,
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


def clear_checkpoints(conn: Connection) -> int:
    """Forget every customer's checkpoint: their next review sums all their orders (once;
    it keeps a checkpoint again). Return how many were cleared. Rows are locked in id
    order, as a review locks its chunk's, so the two wait for each other, never deadlock."""
    locked = (
        select(_v.customer_id)
        .where(_v.checkpoint_at.is_not(None))
        .order_by(_v.customer_id)
        .with_for_update()
        .scalar_subquery()
    )
    cleared = conn.execute(
        update(credit_reviews)
        .where(_v.customer_id.in_(locked))
        .values(checkpoint_at=None, checkpoint_total=None)
    )
    return cleared.rowcount
