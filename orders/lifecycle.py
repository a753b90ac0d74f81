"""A customer's requests after placing an order: cancel it, refund it.

Cancel, while the order is PENDING, cancels its running saga through the
``SagaCanceller``: under the saga's lock, OrderCancelRequested is appended, the steps
without an outcome are recorded as never taking effect, the applied ones compensated,
and the order CANCELLED with reason ``customer_cancelled``. The lock decides between
the cancel and the saga's own completion: whichever takes it first decides, the other
finds the saga decided and yields. A cancel that finds the order confirmed becomes a
refund (the answer says which).

Refund, of a CONFIRMED order, starts the refund saga through a ``SagaStarter`` (staged
in the transaction that appends OrderRefundRequested, dispatched after its commit);
the saga returns stock and credit and marks the order REFUNDED. One refund at a time
per order: asking again while one is under way, or once the order is REFUNDED,
answers the same refund. A refund that failed leaves the order CONFIRMED; it may be
asked for again.

A request with an ``Idempotency-Key`` keeps its answer in the transaction that acts;
the same key for the same request gets the same answer, for another request 422.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

from sqlalchemy import Connection, Engine, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from config.ids import new_id
from config.logs import bind_log_context
from orders.domain import ActOnOrder, CancelReason, EventType, OrderAction, OrderStatus
from orders.errors import IdempotencyKeyReusedError, InvalidTransitionError, OrderNotFoundError
from orders.ports import SagaCanceller, SagaStarter
from orders.services import append_event
from orders.tables import order_action_keys, order_lines, orders
from sagas.definition import SagaStart

logger = logging.getLogger(__name__)

#: What a request did: the order was cancelled, or a refund runs (or ran).
Outcome = Literal["cancelled", "refund"]
CANCELLED: Outcome = "cancelled"
REFUND: Outcome = "refund"


@dataclass(frozen=True)
class ActionTaken:
    """The answer to a cancel or refund request."""

    order_id: UUID
    outcome: Outcome
    refund_saga_id: UUID | None = None
    #: True when the Idempotency-Key named an earlier answer.
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The answer as JSON primitives (also its stored form)."""
        return {
            "order_id": str(self.order_id),
            "outcome": self.outcome,
            "refund_saga_id": str(self.refund_saga_id) if self.refund_saga_id else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, replayed: bool = False) -> ActionTaken:
        """An answer from its stored form."""
        refund = data.get("refund_saga_id")
        saga_id = UUID(refund) if refund else None
        return cls(UUID(data["order_id"]), data["outcome"], saga_id, replayed)


class _Answered(Exception):
    """The request's key was taken meanwhile by the same request: its answer stands."""

    def __init__(self, answer: ActionTaken) -> None:
        super().__init__(answer)
        self.answer = answer


def cancel_order(
    engine: Engine, cmd: ActOnOrder, canceller: SagaCanceller, refunds: SagaStarter
) -> ActionTaken:
    """Cancel the order; a refund when it is confirmed already. InvalidTransitionError
    when it is cancelled (or being cancelled), and then nothing changes."""
    bind_log_context(order_id=cmd.order_id)
    earlier = _earlier_answer(engine, cmd)
    if earlier is not None:
        return earlier
    with engine.connect() as conn:
        row = conn.execute(
            select(orders.c.status, orders.c.saga_id).where(orders.c.id == cmd.order_id)
        ).first()
    if row is None:
        raise OrderNotFoundError(f"no order {cmd.order_id}")
    if row.status == OrderStatus.PENDING:
        taken = ActionTaken(cmd.order_id, CANCELLED)

        def within(conn: Connection) -> None:
            append_event(
                conn,
                cmd.order_id,
                OrderStatus.PENDING,
                EventType.ORDER_CANCEL_REQUESTED,
                {"client": cmd.client},
            )
            _keep_answer(conn, cmd, taken)

        try:
            if canceller.cancel(row.saga_id, CancelReason.CUSTOMER_CANCELLED.value, within):
                logger.info("order cancelled by its customer")
                return taken
        except _Answered as answered:
            return answered.answer
        # The saga was decided first: see what it decided.
    return _refund(engine, cmd, refunds)


def refund_order(engine: Engine, cmd: ActOnOrder, refunds: SagaStarter) -> ActionTaken:
    """Start the refund of a confirmed order (or answer the one under way or done).
    InvalidTransitionError when the order is not confirmed."""
    bind_log_context(order_id=cmd.order_id)
    return _earlier_answer(engine, cmd) or _refund(engine, cmd, refunds)


def _refund(engine: Engine, cmd: ActOnOrder, refunds: SagaStarter) -> ActionTaken:
    try:
        with engine.begin() as conn:
            row = conn.execute(
                select(
                    orders.c.status,
                    orders.c.refund_saga_id,
                    orders.c.customer_id,
                    orders.c.total,
                )
                .where(orders.c.id == cmd.order_id)
                .with_for_update()
            ).first()
            if row is None:
                raise OrderNotFoundError(f"no order {cmd.order_id}")
            earlier = _stored_answer(conn, cmd)
            if earlier is not None:
                return earlier
            if row.refund_saga_id is not None:
                # Under way, or done (REFUNDED): the same refund.
                taken = ActionTaken(cmd.order_id, REFUND, row.refund_saga_id)
                _keep_answer(conn, cmd, taken)
                return taken
            if row.status != OrderStatus.CONFIRMED:
                what = "cancelled" if cmd.action is OrderAction.CANCEL else "refunded"
                raise InvalidTransitionError(
                    f"order {cmd.order_id} is {row.status}: it cannot be {what}"
                )
            start = _start_refund(conn, cmd, refunds, row.customer_id, row.total)
            taken = ActionTaken(cmd.order_id, REFUND, start.saga_id)
            _keep_answer(conn, cmd, taken)
    except _Answered as answered:
        return answered.answer
    refunds.launch(start)
    logger.info("refund %s started", start.saga_id)
    return taken


def _start_refund(
    conn: Connection, cmd: ActOnOrder, refunds: SagaStarter, customer_id: str, total: Decimal
) -> SagaStart:
    """Append the request's events, link the refund saga and stage it."""
    saga_id = new_id()
    bind_log_context(saga_id=saga_id)
    if cmd.action is OrderAction.CANCEL:
        append_event(
            conn,
            cmd.order_id,
            OrderStatus.CONFIRMED,
            EventType.ORDER_CANCEL_REQUESTED,
            {"client": cmd.client},
        )
    append_event(
        conn,
        cmd.order_id,
        OrderStatus.CONFIRMED,
        EventType.ORDER_REFUND_REQUESTED,
        {"refund_saga_id": str(saga_id), "client": cmd.client},
    )
    conn.execute(update(orders).where(orders.c.id == cmd.order_id).values(refund_saga_id=saga_id))
    lines = conn.execute(
        select(order_lines.c.product_id, order_lines.c.quantity)
        .where(order_lines.c.order_id == cmd.order_id)
        .order_by(order_lines.c.line_no)
    ).all()
    start = SagaStart(
        saga_id=saga_id,
        order_id=cmd.order_id,
        payload={
            "order_id": str(cmd.order_id),
            "refund_saga_id": str(saga_id),
            "customer_id": customer_id,
            "amount": str(total),
            "lines": [[line.product_id, line.quantity] for line in lines],
        },
    )
    refunds.stage(conn, start)
    return start


def _earlier_answer(engine: Engine, cmd: ActOnOrder) -> ActionTaken | None:
    if cmd.idempotency_key is None:
        return None
    with engine.connect() as conn:
        return _stored_answer(conn, cmd)


def _stored_answer(conn: Connection, cmd: ActOnOrder) -> ActionTaken | None:
    """The answer kept for the request's key; IdempotencyKeyReusedError if the key was
    used for another request."""
    if cmd.idempotency_key is None:
        return None
    row = conn.execute(
        select(order_action_keys.c.fingerprint, order_action_keys.c.answer).where(
            order_action_keys.c.client == cmd.client,
            order_action_keys.c.key == cmd.idempotency_key,
        )
    ).first()
    if row is None:
        return None
    if row.fingerprint != cmd.fingerprint():
        raise IdempotencyKeyReusedError(
            "this Idempotency-Key was already used for a different request"
        )
    return ActionTaken.from_json(row.answer, replayed=True)


def _keep_answer(conn: Connection, cmd: ActOnOrder, taken: ActionTaken) -> None:
    """Keep the answer under the request's key, in the transaction that acts. A key
    taken meanwhile (a concurrent retry) raises _Answered with its answer, or
    IdempotencyKeyReusedError: the transaction then rolls back."""
    if cmd.idempotency_key is None:
        return
    kept = conn.execute(
        pg_insert(order_action_keys)
        .values(
            client=cmd.client,
            key=cmd.idempotency_key,
            fingerprint=cmd.fingerprint(),
            order_id=cmd.order_id,
            answer=taken.to_json(),
            created_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing()
        .returning(literal(1))
    ).first()
    if kept is None:
        earlier = _stored_answer(conn, cmd)
        assert earlier is not None
        raise _Answered(earlier)
