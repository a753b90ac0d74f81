"""The refund saga: return a confirmed order's stock and its credit in parallel, then mark
the order REFUNDED; or take back what was returned and leave the order CONFIRMED.

It runs on the same engine as the order saga: its own saga row (``sagas.name``
"refund"), ledger rows, deadline, sweeper coverage, outbox relay and dead letters. Its
payload is the order's, read from the order when the refund is asked for
(``orders.lifecycle``), with the refund saga's own id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from sqlalchemy import Connection

from config import names
from orders import credit, inventory, services
from orders.saga_payloads import CreditWriteThrough, amount_of, customer_of, lines_of
from sagas.definition import SagaDefinition, Stage, Step

RETURN_STOCK = "return_stock"
RETURN_CREDIT = "return_credit"
#: The refusal of a refund whose customer does not use the order's amount (credit used
#: was changed by hand): nothing to give back.
CREDIT_NOT_USED = "credit_not_used"

#: One stage of two steps in parallel.
REFUND_SAGA = SagaDefinition(
    name="refund",
    stages=(
        Stage(
            (
                Step(RETURN_STOCK, names.RETURN_STOCK),
                Step(RETURN_CREDIT, names.RETURN_CREDIT),
            )
        ),
    ),
    complete_task=names.COMPLETE_REFUND,
)


def _order(payload: Mapping[str, Any]) -> UUID:
    return UUID(payload["order_id"])


class RefundSaga(CreditWriteThrough):
    """The refund saga's effects, for ``sagas.runner`` (see ``SagaHandlers``)."""

    definition = REFUND_SAGA

    def apply(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> str | None:
        """Put the units back on hand, or give the amount back to the credit."""
        if step == RETURN_STOCK:
            inventory.return_stock(conn, lines_of(payload))
            return None
        if step == RETURN_CREDIT:
            figures = credit.return_credit(conn, customer_of(payload), amount_of(payload))
            if figures is None:
                return CREDIT_NOT_USED
            self._credit_changed(conn, figures)
            return None
        raise ValueError(f"the refund saga has no step {step!r}")

    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Take back what the step returned."""
        if step == RETURN_STOCK:
            inventory.take_back_stock(conn, lines_of(payload))
        elif step == RETURN_CREDIT:
            figures = credit.take_back_credit(conn, customer_of(payload), amount_of(payload))
            self._credit_changed(conn, figures)
        else:
            raise ValueError(f"the refund saga has no step {step!r}")

    def confirm(self, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Both returned: the order is REFUNDED."""
        services.mark_refunded(
            conn,
            _order(payload),
            {"refund_saga_id": payload["refund_saga_id"], "amount": payload["amount"]},
        )

    def cancel(self, conn: Connection, payload: Mapping[str, Any], reason: str) -> None:
        """The refund failed (what it returned was taken back): the order stays CONFIRMED."""
        services.refund_failed(conn, _order(payload), UUID(payload["refund_saga_id"]), reason)

    def compensation_failed(
        self, conn: Connection, payload: Mapping[str, Any], reason: str, problem: str
    ) -> None:
        """Show on the order that its failed refund is not undone yet, and why."""
        services.note_problem(conn, _order(payload), f"the refund failed ({reason}): {problem}")
