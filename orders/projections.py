"""The consumers of the order events: the caches, and the customer order summaries."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Uuid, bindparam, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY, insert

from config.database import prepared
from orders import credit
from orders.cache import CREDIT, DETAILS, STATUS, Caches, Entry
from orders.domain import EventType
from orders.events import Consumer, Event
from orders.queries import StatusView
from orders.tables import customer_order_summaries, orders
from orders.webhook_deliveries import WebhookOutbox

_o = orders.c
_ORDERS = select(
    _o.id, _o.status, _o.cancel_reason, _o.updated_at, _o.version, _o.customer_id, _o.total
).where(_o.id == func.any(bindparam("ids", type_=ARRAY(Uuid))))
_cs = customer_order_summaries.c
#: What one pass adds to each customer's summary, one array per column (a statement of
#: one shape whatever the number of customers, so it is compiled once and prepared).
_SUMMED = (
    "orders_placed",
    "orders_confirmed",
    "orders_cancelled",
    "placed_total",
    "confirmed_total",
    "last_order_at",
    "orders_refunded",
    "refunded_total",
)
_deltas = (
    func.unnest(
        *(cast(bindparam(name), ARRAY(_cs[name].type)) for name in ("customer_id", *_SUMMED))
    )
    .table_valued("customer_id", *_SUMMED)
    .render_derived()
)
_new = insert(customer_order_summaries).excluded
_ADD_TO_SUMMARIES = prepared(
    "add_to_summaries",
    insert(customer_order_summaries)
    .from_select(["customer_id", *_SUMMED], select(_deltas))
    .on_conflict_do_update(
        index_elements=[_cs.customer_id],
        set_={
            **{name: _cs[name] + _new[name] for name in _SUMMED if name != "last_order_at"},
            "last_order_at": func.greatest(_cs.last_order_at, _new.last_order_at),
        },
    ),
)
#: Events after which a customer's credit figures are not what they were.
CREDIT_CHANGES = frozenset(
    {
        EventType.ORDER_CONFIRMED.value,
        EventType.ORDER_CANCELLED.value,
        EventType.ORDER_COMPENSATION_FAILED.value,
        EventType.ORDER_REFUNDED.value,
        EventType.ORDER_REFUND_FAILED.value,
    }
)


def credit_entry(figures: credit.CreditFigures) -> Entry:
    """A customer's credit as the credit cache holds it."""
    return Entry(
        figures.version,
        {
            "customer_id": figures.customer_id,
            "limit": str(figures.limit),
            "used": str(figures.used),
            "reserved": str(figures.reserved),
            "available": str(figures.available),
        },
    )


def figures_of(entry: Entry) -> credit.CreditFigures:
    """The credit figures a cache entry holds."""
    value = entry.value
    return credit.CreditFigures(
        value["customer_id"],
        Decimal(value["limit"]),
        Decimal(value["used"]),
        Decimal(value["reserved"]),
        entry.version,
    )


class CacheRefresher:
    """Keeps the caches fresh: an order's events write its current status (never over a
    newer one) and remove its cached details; confirmation, cancellation and a refund's
    end refresh the customer's credit figures. Redis is written before the positions
    commit: an event is applied again if the commit fails, which writes the same values."""

    name = "caches"

    def __init__(self, caches: Caches) -> None:
        self.caches = caches

    def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        """Refresh the caches of these events' orders and customers."""
        ids = list({event.order_id for event in events})
        rows = conn.execute(_ORDERS, {"ids": ids}).all()
        statuses = {
            row.id: Entry(
                row.version,
                StatusView(
                    row.id,
                    row.status,
                    row.cancel_reason,
                    row.updated_at,
                    row.version,
                    row.customer_id,
                ).to_json(),
            )
            for row in rows
        }
        customer_of = {row.id: row.customer_id for row in rows}
        touched = {customer_of[e.order_id] for e in events if e.type in CREDIT_CHANGES}
        figures = credit.credit_figures(conn, sorted(touched)) if touched else []
        self.caches.refresh(
            {STATUS: statuses, CREDIT: {f.customer_id: credit_entry(f) for f in figures}},
            {DETAILS: ids},
        )


class CustomerSummaries:
    """The per-customer order summary: orders placed, confirmed, cancelled and refunded,
    their totals, the last order's date. A refunded order stays counted as confirmed
    (it was); its refund is counted apart."""

    name = "customer_summary"

    def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        """Add these events to their customers' summaries (one statement)."""
        rows = conn.execute(_ORDERS, {"ids": list({e.order_id for e in events})}).all()
        order = {row.id: row for row in rows}
        deltas: dict[str, dict[str, Any]] = defaultdict(
            lambda: {
                "orders_placed": 0,
                "orders_confirmed": 0,
                "orders_cancelled": 0,
                "placed_total": Decimal(0),
                "confirmed_total": Decimal(0),
                "last_order_at": None,
                "orders_refunded": 0,
                "refunded_total": Decimal(0),
            }
        )
        for event in events:
            row = order[event.order_id]
            delta = deltas[row.customer_id]
            if event.type == EventType.ORDER_PLACED:
                delta["orders_placed"] += 1
                delta["placed_total"] += row.total
                delta["last_order_at"] = _later(delta["last_order_at"], event.occurred_at)
            elif event.type == EventType.ORDER_CONFIRMED:
                delta["orders_confirmed"] += 1
                delta["confirmed_total"] += row.total
            elif event.type == EventType.ORDER_CANCELLED:
                delta["orders_cancelled"] += 1
            elif event.type == EventType.ORDER_REFUNDED:
                delta["orders_refunded"] += 1
                delta["refunded_total"] += row.total
        if not deltas:
            return
        customers = list(deltas)
        conn.execute(
            _ADD_TO_SUMMARIES,
            {
                "customer_id": customers,
                **{
                    column: [deltas[customer][column] for customer in customers]
                    for column in _SUMMED
                },
            },
        )


def _later(a: datetime | None, b: datetime) -> datetime:
    return b if a is None or b > a else a


def event_consumers(caches: Caches | None) -> list[Consumer]:
    """The consumers of a deployment (no cache refresher without caches)."""
    found: list[Consumer] = [CustomerSummaries(), WebhookOutbox()]
    if caches is not None:
        found.insert(0, CacheRefresher(caches))
    return found
