"""Reads through the caches: statuses, final orders and credit figures from Redis when
they are there, from PostgreSQL otherwise (and then cached, never over a newer value)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from uuid import UUID

from sqlalchemy import Connection, Engine

from orders import queries
from orders.cache import CREDIT, DETAILS, STATUS, Caches, Entry
from orders.credit import CreditFigures, credit_figures
from orders.domain import OrderStatus
from orders.projections import credit_entry, figures_of
from orders.queries import OrderView, StatusView

#: Orders that never change again: their details are cached without a TTL.
FINAL = frozenset({OrderStatus.CONFIRMED.value, OrderStatus.CANCELLED.value})


class Reader:
    """The read side of the API. Without caches, every read goes to PostgreSQL."""

    def __init__(self, engine: Engine, caches: Caches | None) -> None:
        self.engine = engine
        self.caches = caches

    def status(self, order_id: UUID) -> StatusView | None:
        """One order's status (one flight to PostgreSQL per missing hot key)."""
        if self.caches is None:
            return queries.get_status(self.engine, order_id)
        hit = self.caches.get(STATUS, [order_id]).get(str(order_id))
        if hit is not None and "customer_id" in hit.value:
            return StatusView.from_json(hit.value, hit.version)

        def load() -> StatusView | None:
            return self._load_statuses([order_id]).get(order_id)

        def cached(entry: Entry) -> StatusView | None:
            # An entry written before statuses named their customer (an older process
            # of a rolling deploy) is a miss: the key's scope needs the customer.
            if "customer_id" not in entry.value:
                return load()
            return StatusView.from_json(entry.value, entry.version)

        return self.caches.load_once(STATUS, order_id, load, cached)

    def statuses(self, order_ids: Sequence[UUID]) -> dict[UUID, StatusView]:
        """Many orders' statuses: one MGET, and one query for the misses."""
        found: dict[UUID, StatusView] = {}
        if self.caches is not None:
            for key, entry in self.caches.get(STATUS, order_ids).items():
                if "customer_id" in entry.value:  # older entries lack it: read again
                    found[UUID(key)] = StatusView.from_json(entry.value, entry.version)
        missing = [order_id for order_id in order_ids if order_id not in found]
        if missing:
            found.update(self._load_statuses(missing))
        return found

    def _load_statuses(self, order_ids: Sequence[UUID]) -> dict[UUID, StatusView]:
        views = queries.get_statuses(self.engine, order_ids)
        if self.caches is not None:
            self.caches.put(
                STATUS, {i: Entry(view.version, view.to_json()) for i, view in views.items()}
            )
        return views

    def order(self, order_id: UUID) -> OrderView | None:
        """An order with its lines; a final one from the details cache."""
        if self.caches is not None:
            hit = self.caches.get(DETAILS, [order_id]).get(str(order_id))
            if hit is not None:
                return OrderView.from_json(hit.value, hit.version)
        view = queries.get_order(self.engine, order_id)
        if view is not None and view.status in FINAL and self.caches is not None:
            self.caches.put(DETAILS, {order_id: Entry(view.version, view.to_json())})
        return view

    def credit(self, customer_id: str) -> CreditFigures | None:
        """A customer's credit figures (limit, used, reserved, available)."""
        if self.caches is None:
            return self._load_credit(customer_id)
        hit = self.caches.get(CREDIT, [customer_id]).get(customer_id)
        if hit is not None:
            return figures_of(hit)
        return self.caches.load_once(
            CREDIT, customer_id, lambda: self._load_credit(customer_id), figures_of
        )

    def credit_shortfall(
        self, conn: Connection, customer_id: str, amount: Decimal
    ) -> Decimal | None:
        """The credit pre-check, in the order's transaction (``conn``): None when the
        customer's available credit covers ``amount``, else what is available. The
        cache answers yes; a miss or a no is read in PostgreSQL on ``conn`` (a stale
        cache never refuses an order, and the check takes no second connection)."""
        if self.caches is not None:
            hit = self.caches.get(CREDIT, [customer_id]).get(customer_id)
            if hit is not None and figures_of(hit).available >= amount:
                return None
        figures = self._load_credit(customer_id, conn)
        if figures is None or figures.available >= amount:
            return None  # an unknown customer is refused by the order's own checks
        return figures.available

    def _load_credit(
        self, customer_id: str, conn: Connection | None = None
    ) -> CreditFigures | None:
        if conn is None:
            with self.engine.connect() as own:
                found = credit_figures(own, [customer_id])
        else:
            found = credit_figures(conn, [customer_id])
        if found and self.caches is not None:
            self.caches.put(CREDIT, {customer_id: credit_entry(found[0])})
        return found[0] if found else None
