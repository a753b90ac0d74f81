"""The refund saga: return a confirmed order's stock and its credit in parallel, then mark
the order REFUNDED; or take back what was returned and leave the order CONFIRMED.

It runs on the same engine as the order saga: its own saga row (``sagas.name``
"refund"), ledger rows, deadline, sweeper coverage, outbox relay and dead letters. Its
payload is the order's, read from the order when the refund is asked for
(``orders.lifecycle``), with the refund saga's own id.

Also here: ``RunningSagaCanceller``, the API's ``SagaCanceller`` (a customer's cancel of
an order whose saga is running).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, Engine

from config import names
from orders import credit, inventory, services
from sagas import runner
from sagas.definition import SagaDefinition, Step
from sagas.payloads import CreditWriteThrough, amount_of, customer_of, lines_of
from sagas.runner import Escalate, RetryAfter, SagaHandlers

RETURN_STOCK = "return_stock"
RETURN_CREDIT = "return_credit"
#: The refusal of a refund whose customer does not use the order's amount (credit used
#: was changed by hand): nothing to give back.
CREDIT_NOT_USED = "credit_not_used"

REFUND_SAGA = SagaDefinition(
    name="refund",
    steps=(
        Step(RETURN_STOCK, names.RETURN_STOCK),
        Step(RETURN_CREDIT, names.RETURN_CREDIT),
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


class RunningSagaCanceller:
    """The API's ``SagaCanceller``: cancels a running saga in the request (see
    ``runner.cancel``); a compensation that fails is left to the sweeper, as any."""

    def __init__(
        self,
        engine: Engine,
        saga: SagaHandlers,
        retry_after: RetryAfter,
        escalate: Escalate | None = None,
    ) -> None:
        self.engine = engine
        self.saga = saga
        self.retry_after = retry_after
        self.escalate = escalate

    def cancel(self, saga_id: UUID, reason: str, within: Callable[[Connection], None]) -> bool:
        """Cancel the saga if it is running; False if it was decided first."""
        done = runner.cancel(
            self.engine,
            self.saga,
            saga_id,
            reason,
            retry_after=self.retry_after,
            within=within,
            escalate=self.escalate,
        )
        return done.decision is not None
