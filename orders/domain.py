"""Orders, their lines and statuses, and money. Pure: no I/O here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from enum import StrEnum
from uuid import UUID

#: Money has two decimal places; amounts are rounded half-even to them.
CENT = Decimal("0.01")


def money(value: Decimal | int | str) -> Decimal:
    """Return ``value`` as an amount of money (a Decimal with two places)."""
    return Decimal(value).quantize(CENT, rounding=ROUND_HALF_EVEN)


class OrderStatus(StrEnum):
    """Where an order stands. PENDING ends CONFIRMED or CANCELLED; an order whose
    reservations could not be released waits in COMPENSATION_FAILED until they are. A
    CONFIRMED order whose refund completed is REFUNDED (final: nothing changes it)."""

    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    CANCELLED = "CANCELLED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    REFUNDED = "REFUNDED"


#: The statuses an order can move to from each status.
TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset(
        {OrderStatus.CONFIRMED, OrderStatus.CANCELLED, OrderStatus.COMPENSATION_FAILED}
    ),
    OrderStatus.COMPENSATION_FAILED: frozenset({OrderStatus.CANCELLED}),
    OrderStatus.CONFIRMED: frozenset({OrderStatus.REFUNDED}),
    OrderStatus.CANCELLED: frozenset(),
    OrderStatus.REFUNDED: frozenset(),
}


def statuses_before(status: OrderStatus) -> frozenset[OrderStatus]:
    """The statuses from which an order may move to ``status``."""
    return frozenset(old for old, new in TRANSITIONS.items() if status in new)


class CancelReason(StrEnum):
    """Why an order was cancelled."""

    OUT_OF_STOCK = "out_of_stock"
    CREDIT_LIMIT_EXCEEDED = "credit_limit_exceeded"
    #: The customer cancelled the order while its saga was running.
    CUSTOMER_CANCELLED = "customer_cancelled"
    #: An operator cancelled the running saga (python -m workers.sagas cancel, or
    #: POST /admin/sagas/<id>/cancel): what it had reserved was released.
    OPERATOR_CANCELLED = "operator_cancelled"


class EventType(StrEnum):
    """The events appended to an order's log, one per change."""

    ORDER_PLACED = "OrderPlaced"
    ORDER_CONFIRMED = "OrderConfirmed"
    ORDER_CANCELLED = "OrderCancelled"
    ORDER_COMPENSATION_FAILED = "OrderCompensationFailed"
    #: The customer asked to cancel (no change of status: what follows says what it did,
    #: OrderCancelled, or a refund when the order was confirmed first).
    ORDER_CANCEL_REQUESTED = "OrderCancelRequested"
    #: A refund saga started for the confirmed order (payload: its refund_saga_id).
    ORDER_REFUND_REQUESTED = "OrderRefundRequested"
    #: The refund completed: stock and credit returned, the order REFUNDED.
    ORDER_REFUNDED = "OrderRefunded"
    #: The refund was refused or failed; what it had returned was taken back and the
    #: order stays CONFIRMED (payload: reason, refund_saga_id).
    ORDER_REFUND_FAILED = "OrderRefundFailed"


class OrderAction(StrEnum):
    """What a customer may ask of an order after placing it."""

    CANCEL = "cancel"
    REFUND = "refund"


@dataclass(frozen=True)
class ActOnOrder:
    """The command to cancel or refund an order, as the API parsed it (the key already
    allowed to act for the order's customer)."""

    order_id: UUID
    action: OrderAction
    #: Who sent it (idempotency keys are scoped per client).
    client: str
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """A digest of what was asked, to tell a retry from a different request."""
        return hashlib.sha256(f"{self.action}:{self.order_id}".encode()).hexdigest()


@dataclass(frozen=True)
class OrderLine:
    """One product and how many of it."""

    product_id: str
    quantity: int


@dataclass(frozen=True)
class PlaceOrder:
    """The command to accept an order, as the API parsed it."""

    customer_id: str
    lines: tuple[OrderLine, ...]
    #: Who sent it (idempotency keys are scoped per client).
    client: str
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """A digest of what was asked, to tell a retry from a different request."""
        body = {
            "customer_id": self.customer_id,
            "lines": [[line.product_id, line.quantity] for line in self.lines],
        }
        canonical = json.dumps(body, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


#: The largest amount an account or an order holds (NUMERIC(14, 2)).
MAX_AMOUNT = Decimal("999999999999.99")


def order_total(lines: tuple[OrderLine, ...], prices: dict[str, Decimal]) -> Decimal:
    """The order's amount: the sum of quantity times unit price."""
    return money(sum((prices[line.product_id] * line.quantity for line in lines), Decimal(0)))
