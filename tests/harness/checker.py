"""The "nothing lost" invariants, checked from PostgreSQL after the system went quiet.

The checker is scoped to a world of customers and products a test created, with the
stock each product started with; it proves, from the rows alone, that every order ended,
and that stock and credit moved exactly as the confirmed orders say (a refunded order
holds nothing: its refund returned it all).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, func, or_, select

from orders.tables import customers, order_events, order_lines, orders, products
from sagas.tables import outbox, saga_steps, sagas

TERMINAL = {"CONFIRMED", "CANCELLED", "REFUNDED"}
TERMINAL_EVENTS = {
    "OrderConfirmed": "CONFIRMED",
    "OrderCancelled": "CANCELLED",
    "OrderRefunded": "REFUNDED",
}
#: The final events an order in each final status has, in order: one per change.
FINAL_EVENTS = {
    "CONFIRMED": ["CONFIRMED"],
    "CANCELLED": ["CANCELLED"],
    "REFUNDED": ["CONFIRMED", "REFUNDED"],
}
#: The state of an order's own saga, by the order's final status.
SAGA_STATE = {"CONFIRMED": "CONFIRMED", "CANCELLED": "CANCELLED", "REFUNDED": "CONFIRMED"}


@dataclass(frozen=True)
class Violation:
    """One broken invariant, with what shows it."""

    invariant: str
    evidence: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.evidence}"


@dataclass
class World:
    """What a test created: its customers, and its products with their starting stock."""

    customers: set[str] = field(default_factory=set)
    initial_stock: dict[str, int] = field(default_factory=dict)
    #: Orders allowed to rest in COMPENSATION_FAILED (a test forced it).
    compensation_failed_allowed: set[UUID] = field(default_factory=set)


@dataclass
class Report:
    """The checker's verdict and the counts it saw."""

    violations: list[Violation]
    counts: dict[str, int]

    @property
    def ok(self) -> bool:
        """Whether every invariant held."""
        return not self.violations


def check(engine: Engine, world: World) -> Report:
    """Check invariants 2 to 7 over the world's orders."""
    found: list[Violation] = []
    with engine.connect() as conn:
        order_rows = conn.execute(
            select(
                orders.c.id,
                orders.c.status,
                orders.c.version,
                orders.c.saga_id,
                orders.c.total,
                orders.c.customer_id,
                orders.c.refund_saga_id,
            ).where(orders.c.customer_id.in_(world.customers))
        ).all()
        ids = [row.id for row in order_rows]
        refund_rows = _refund_sagas(conn, ids)
        saga_ids = [row.saga_id for row in order_rows] + [row.id for row in refund_rows]
        events = _grouped(
            conn.execute(
                select(order_events.c.order_id, order_events.c.seq, order_events.c.type)
                .where(order_events.c.order_id.in_(ids))
                .order_by(order_events.c.seq)
            ).all()
        )
        saga_rows = {
            row.id: row
            for row in conn.execute(
                select(sagas.c.id, sagas.c.state).where(sagas.c.id.in_(saga_ids))
            )
        }
        steps = _grouped(
            conn.execute(
                select(saga_steps.c.saga_id, saga_steps.c.step, saga_steps.c.status).where(
                    saga_steps.c.saga_id.in_(saga_ids)
                )
            ).all()
        )
        queued = conn.execute(
            select(func.count()).select_from(outbox).where(outbox.c.saga_id.in_(saga_ids))
        ).scalar_one()
        confirmed_units = dict(
            conn.execute(
                select(order_lines.c.product_id, func.sum(order_lines.c.quantity))
                .join(orders, orders.c.id == order_lines.c.order_id)
                .where(orders.c.status == "CONFIRMED")
                .where(order_lines.c.product_id.in_(world.initial_stock))
                .group_by(order_lines.c.product_id)
            ).all()
        )
        stock = {
            row.id: row
            for row in conn.execute(
                select(products.c.id, products.c.on_hand, products.c.reserved).where(
                    products.c.id.in_(world.initial_stock)
                )
            )
        }
        credit = {
            row.id: row
            for row in conn.execute(
                select(
                    customers.c.id,
                    customers.c.credit_used,
                    customers.c.credit_reserved,
                    customers.c.credit_limit,
                ).where(customers.c.id.in_(world.customers))
            )
        }

    counts: dict[str, int] = defaultdict(int)
    confirmed_amount: dict[str, Decimal] = defaultdict(Decimal)
    refunds_of = _grouped((UUID(row.order_id), row) for row in refund_rows)
    for row in order_rows:
        counts[row.status] += 1
        allowed = TERMINAL | (
            {"COMPENSATION_FAILED"} if row.id in world.compensation_failed_allowed else set()
        )
        if row.status not in allowed:
            found.append(Violation("2 every order is final", f"order {row.id} is {row.status}"))
        saga = saga_rows.get(row.saga_id)
        if saga is None or saga.state != SAGA_STATE.get(row.status, row.status):
            found.append(
                Violation(
                    "2 every saga is final and agrees with its order",
                    f"order {row.id} {row.status}, saga {saga.state if saga else 'missing'}",
                )
            )
        found += _check_events(row, events.get(row.id, []))
        found += _check_ledger(row, steps.get(row.saga_id, []))
        found += _check_refunds(row, [r for _, r in refunds_of.get(row.id, [])], steps)
        if row.status == "CONFIRMED":
            confirmed_amount[row.customer_id] += row.total
    if queued:
        found.append(Violation("2 the outbox is drained", f"{queued} entries left"))
    for product_id, initial in world.initial_stock.items():
        now = stock[product_id]
        sold = int(confirmed_units.get(product_id) or 0)
        if now.reserved != 0 or initial - now.on_hand != sold:
            found.append(
                Violation(
                    "4 stock moved exactly by the confirmed orders",
                    f"{product_id}: started {initial}, on hand {now.on_hand}, reserved "
                    f"{now.reserved}, confirmed {sold}",
                )
            )
    for customer_id, row in credit.items():
        if row.credit_reserved != 0 or row.credit_used != confirmed_amount[customer_id]:
            found.append(
                Violation(
                    "5 credit moved exactly by the confirmed orders",
                    f"{customer_id}: used {row.credit_used}, reserved {row.credit_reserved}, "
                    f"confirmed {confirmed_amount[customer_id]}",
                )
            )
    return Report(found, dict(counts))


def _grouped(rows: Iterable[Any]) -> dict[Any, list[Any]]:
    grouped: dict[Any, list[Any]] = defaultdict(list)
    for row in rows:
        grouped[row[0]].append(row)
    return grouped


def _check_events(order: Any, events: list[Any]) -> list[Violation]:
    found = []
    seqs = [event.seq for event in events]
    if seqs != list(range(1, len(seqs) + 1)) or len(seqs) != order.version:
        found.append(
            Violation(
                "7 events are numbered 1..n with no gap",
                f"order {order.id}: seqs {seqs}, version {order.version}",
            )
        )
    finals = [TERMINAL_EVENTS[e.type] for e in events if e.type in TERMINAL_EVENTS]
    if order.status in TERMINAL and finals != FINAL_EVENTS[order.status]:
        found.append(
            Violation(
                "3 exactly one final event, matching the status",
                f"order {order.id} {order.status}: final events {finals}",
            )
        )
    if events and events[0].type != "OrderPlaced":
        found.append(Violation("3 the first event is OrderPlaced", f"order {order.id}"))
    return found


def _refund_sagas(conn: Any, order_ids: list[UUID]) -> list[Any]:
    """Every refund saga of these orders (the current one and the failed ones)."""
    if not order_ids:
        return []
    order_id = sagas.c.payload["order_id"].astext
    return list(
        conn.execute(
            select(order_id.label("order_id"), sagas.c.id, sagas.c.state)
            .where(sagas.c.name == "refund")
            .where(order_id.in_([str(i) for i in order_ids]))
        ).all()
    )


def _check_refunds(
    order: Any, refunds: list[Any], steps: Mapping[Any, list[Any]]
) -> list[Violation]:
    """A REFUNDED order has exactly one refund, confirmed with every step applied (its
    current one); a failed refund took back everything it returned; none is left
    running."""
    found = []
    confirmed = [r for r in refunds if r.state == "CONFIRMED"]
    wanted = 1 if order.status == "REFUNDED" else 0
    if len(confirmed) != wanted or (confirmed and confirmed[0].id != order.refund_saga_id):
        found.append(
            Violation(
                "9 a refunded order has one refund saga, confirmed, and no other",
                f"order {order.id} {order.status}: refunds {[(r.id, r.state) for r in refunds]}",
            )
        )
    for refund in refunds:
        statuses = {step.step: step.status for step in steps.get(refund.id, [])}
        if refund.state not in ("CONFIRMED", "CANCELLED"):
            found.append(
                Violation("2 every refund saga is final", f"order {order.id}: {refund.state}")
            )
        elif (refund.state == "CONFIRMED") != (set(statuses.values()) == {"APPLIED"}) or (
            refund.state == "CANCELLED" and "APPLIED" in statuses.values()
        ):
            found.append(
                Violation(
                    "9 a refund's steps agree with its decision",
                    f"order {order.id}, refund {refund.id} {refund.state}: {statuses}",
                )
            )
    return found


def _check_ledger(order: Any, steps: list[Any]) -> list[Violation]:
    statuses = {step.step: step.status for step in steps}
    if order.status in ("CONFIRMED", "REFUNDED") and set(statuses.values()) != {"APPLIED"}:
        return [
            Violation(
                "6 a confirmed saga has every step applied, none compensated",
                f"order {order.id}: {statuses}",
            )
        ]
    if order.status == "CANCELLED" and "APPLIED" in statuses.values():
        return [
            Violation(
                "6 a cancelled saga compensated every applied step", f"order {order.id}: {statuses}"
            )
        ]
    return []


def quiet(engine: Engine, world: World) -> bool:
    """Whether every order of the world is final and its outbox entries are gone."""
    allowed = TERMINAL | {"COMPENSATION_FAILED"}
    with engine.connect() as conn:
        busy = conn.execute(
            select(func.count())
            .select_from(orders)
            .where(orders.c.customer_id.in_(world.customers))
            .where(orders.c.status.not_in(allowed))
        ).scalar_one()
        queued = conn.execute(
            select(func.count())
            .select_from(outbox)
            .join(
                orders,
                or_(
                    orders.c.saga_id == outbox.c.saga_id,
                    orders.c.refund_saga_id == outbox.c.saga_id,
                ),
            )
            .where(orders.c.customer_id.in_(world.customers))
        ).scalar_one()
        # Refunds under way (and their outbox entries): the order is CONFIRMED meanwhile.
        refunding = conn.execute(
            select(func.count())
            .select_from(orders)
            .join(sagas, sagas.c.id == orders.c.refund_saga_id)
            .where(orders.c.customer_id.in_(world.customers))
            .where(sagas.c.state.not_in(["CONFIRMED", "CANCELLED"]))
        ).scalar_one()
    return busy == 0 and queued == 0 and refunding == 0


def settle(engine: Engine, world: World, timeout: float = 60.0) -> Report:
    """Wait until the world is quiet (or the timeout passes), then check it."""
    deadline = time.monotonic() + timeout
    while not quiet(engine, world) and time.monotonic() < deadline:
        time.sleep(0.1)
    return check(engine, world)


def require(report: Report, context: str = "") -> None:
    """Fail with every violation listed."""
    if not report.ok:
        lines = "\n  ".join(str(v) for v in report.violations[:50])
        raise AssertionError(f"invariants broken {context}({len(report.violations)}):\n  {lines}")


def world_of(customer_ids: Iterable[str], stock: Mapping[str, int]) -> World:
    """A world made of these customers and products."""
    return World(set(customer_ids), dict(stock))
