"""The order saga: reserve stock and reserve credit in parallel, then confirm the order or
release what was reserved and cancel it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from sqlalchemy import Connection

from config import names
from orders import credit, inventory, services
from orders.credit import CreditFigures
from orders.domain import CancelReason
from orders.refund_saga import RefundSaga
from orders.saga_payloads import CreditWriteThrough, amount_of, customer_of, lines_of
from sagas.definition import SagaDefinition, Stage, Step
from sagas.registry import SagaRegistry

RESERVE_STOCK = "reserve_stock"
RESERVE_CREDIT = "reserve_credit"

#: One stage of two steps in parallel.
ORDER_SAGA = SagaDefinition(
    name="order",
    stages=(
        Stage(
            (
                Step(RESERVE_STOCK, names.RESERVE_STOCK),
                Step(RESERVE_CREDIT, names.RESERVE_CREDIT),
            )
        ),
    ),
    complete_task=names.COMPLETE_ORDER,
)


class OrderSaga(CreditWriteThrough):
    """The order saga's effects, for ``sagas.runner`` (see ``SagaHandlers``)."""

    definition = ORDER_SAGA

    def apply(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> str | None:
        """Reserve the stock or the credit; the refusal reason when there is not enough."""
        if step == RESERVE_STOCK:
            if inventory.reserve_stock(conn, lines_of(payload)):
                return None
            return CancelReason.OUT_OF_STOCK.value
        if step == RESERVE_CREDIT:
            figures = credit.reserve_credit(conn, customer_of(payload), amount_of(payload))
            if figures is not None:
                self._credit_changed(conn, figures)
                return None
            return CancelReason.CREDIT_LIMIT_EXCEEDED.value
        raise ValueError(f"the order saga has no step {step!r}")

    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Release the stock or the credit that the step reserved."""
        if step == RESERVE_STOCK:
            inventory.release_stock(conn, lines_of(payload))
        elif step == RESERVE_CREDIT:
            figures = credit.release_credit(conn, customer_of(payload), amount_of(payload))
            self._credit_changed(conn, figures)
        else:
            raise ValueError(f"the order saga has no step {step!r}")

    def confirm(self, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Turn both reservations into stock gone and credit used; confirm the order."""
        order_id, lines = UUID(payload["order_id"]), lines_of(payload)
        figures = services.confirm_order(
            conn, order_id, lines, customer_of(payload), amount_of(payload)
        )
        self._credit_changed(conn, figures)

    def cancel(self, conn: Connection, payload: Mapping[str, Any], reason: str) -> None:
        """Cancel the order with the reason."""
        services.cancel_order(conn, UUID(payload["order_id"]), reason)

    def compensation_failed(
        self, conn: Connection, payload: Mapping[str, Any], reason: str, problem: str
    ) -> None:
        """Show on the order that its reservations are not released yet, and why."""
        services.mark_compensation_failed(conn, UUID(payload["order_id"]), reason, problem)


def order_sagas(on_credit: Callable[[CreditFigures], None] | None = None) -> SagaRegistry:
    """The order domain's sagas (every version), their credit changes told to
    ``on_credit`` once committed (the credit cache's write-through)."""
    return SagaRegistry([OrderSaga(on_credit=on_credit), RefundSaga(on_credit=on_credit)])


#: The order domain's sagas by name and version, for what only reads their definitions
#: (the outbox relay, dead-letter replays, tools); what runs their steps builds its own
#: with the credit cache's write-through (``order_sagas(on_credit)``).
DEFINITIONS = order_sagas()
