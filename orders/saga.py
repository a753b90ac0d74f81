"""The order saga: reserve stock and reserve credit in parallel, then confirm the order or
release what was reserved and cancel it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from sqlalchemy import Connection

from config import names
from orders import credit, inventory, services
from orders.domain import CancelReason
from orders.refund_saga import REFUND_SAGA
from orders.saga_payloads import CreditWriteThrough, amount_of, customer_of, lines_of
from sagas.definition import SagaDefinition, Step

RESERVE_STOCK = "reserve_stock"
RESERVE_CREDIT = "reserve_credit"

ORDER_SAGA = SagaDefinition(
    name="order",
    steps=(
        Step(RESERVE_STOCK, names.RESERVE_STOCK),
        Step(RESERVE_CREDIT, names.RESERVE_CREDIT),
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


#: Every saga definition by name, for the outbox relay, the sweeper and the dead letters.
DEFINITIONS: Mapping[str, SagaDefinition] = {
    ORDER_SAGA.name: ORDER_SAGA,
    REFUND_SAGA.name: REFUND_SAGA,
}
