"""The order use cases: accept an order, confirm it, cancel it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, Engine, exists, insert, literal, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from config.failpoints import failpoint
from orders.domain import (
    CancelReason,
    EventType,
    OrderStatus,
    PlaceOrder,
    order_total,
    statuses_before,
)
from orders.errors import IdempotencyKeyReusedError, InvalidOrderError, InvalidTransitionError
from orders.ports import SagaStart, SagaStarter
from orders.tables import customers, idempotency_keys, order_events, order_lines, orders, products


@dataclass(frozen=True)
class Accepted:
    """An accepted order: its ids, and whether this answers a retried request."""

    order_id: UUID
    saga_id: UUID
    #: True when the Idempotency-Key named an order accepted earlier.
    replayed: bool = False


def place_order(engine: Engine, cmd: PlaceOrder, starter: SagaStarter) -> Accepted:
    """Accept an order and start its saga.

    The order, its lines, its first event and the saga's outbox entry commit in one
    transaction; the saga is dispatched after the commit. Raises InvalidOrderError or
    IdempotencyKeyReusedError, and then nothing is written."""
    now = datetime.now(UTC)
    order_id, saga_id = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as conn:
        if cmd.idempotency_key is not None:
            earlier = _claim_idempotency_key(conn, cmd, order_id, now)
            if earlier is not None:
                return earlier
        prices = _prices_of_known_products(conn, cmd)
        total = order_total(cmd.lines, prices)
        conn.execute(
            insert(orders).values(
                id=order_id,
                customer_id=cmd.customer_id,
                saga_id=saga_id,
                status=OrderStatus.PENDING,
                total=total,
                version=1,
                created_at=now,
                updated_at=now,
            )
        )
        conn.execute(
            insert(order_lines),
            [
                {
                    "order_id": order_id,
                    "line_no": line_no,
                    "product_id": line.product_id,
                    "quantity": line.quantity,
                    "unit_price": prices[line.product_id],
                }
                for line_no, line in enumerate(cmd.lines, start=1)
            ],
        )
        _append_event(conn, order_id, 1, EventType.ORDER_PLACED, {"total": str(total)}, now)
        start = SagaStart(
            saga_id=saga_id,
            order_id=order_id,
            payload={
                "order_id": str(order_id),
                "customer_id": cmd.customer_id,
                "amount": str(total),
                "lines": [[line.product_id, line.quantity] for line in cmd.lines],
            },
        )
        starter.stage(conn, start)
    failpoint("api.after_commit")
    starter.launch(start)
    return Accepted(order_id=order_id, saga_id=saga_id)


def confirm_order(conn: Connection, order_id: UUID) -> None:
    """Mark a pending order confirmed and append OrderConfirmed."""
    _move(conn, order_id, OrderStatus.CONFIRMED, EventType.ORDER_CONFIRMED, {})


def cancel_order(conn: Connection, order_id: UUID, reason: CancelReason | str) -> None:
    """Mark the order cancelled with its reason and append OrderCancelled."""
    _move(
        conn,
        order_id,
        OrderStatus.CANCELLED,
        EventType.ORDER_CANCELLED,
        {"reason": str(reason)},
        cancel_reason=str(reason),
        problem=None,
    )


def mark_compensation_failed(conn: Connection, order_id: UUID, reason: str, problem: str) -> None:
    """Record that the order's reservations could not be released (yet).

    The first time appends OrderCompensationFailed; later failures only update the
    problem, so a retried compensation does not grow the event log."""
    status = conn.execute(
        select(orders.c.status).where(orders.c.id == order_id).with_for_update()
    ).scalar_one()
    if status == OrderStatus.COMPENSATION_FAILED:
        conn.execute(
            update(orders)
            .where(orders.c.id == order_id)
            .values(problem=problem, updated_at=datetime.now(UTC))
        )
        return
    _move(
        conn,
        order_id,
        OrderStatus.COMPENSATION_FAILED,
        EventType.ORDER_COMPENSATION_FAILED,
        {"reason": reason, "problem": problem},
        cancel_reason=reason,
        problem=problem,
    )


def _move(
    conn: Connection,
    order_id: UUID,
    status: OrderStatus,
    event: EventType,
    payload: dict[str, Any],
    **columns: Any,
) -> None:
    """Change the order's status if the transition is legal, and append its event."""
    now = datetime.now(UTC)
    version = conn.execute(
        update(orders)
        .where(orders.c.id == order_id)
        .where(orders.c.status.in_(statuses_before(status)))
        .values(status=status, version=orders.c.version + 1, updated_at=now, **columns)
        .returning(orders.c.version)
    ).scalar_one_or_none()
    if version is None:
        raise InvalidTransitionError(f"order {order_id} cannot become {status}")
    _append_event(conn, order_id, version, event, payload, now)


def _append_event(
    conn: Connection,
    order_id: UUID,
    seq: int,
    event: EventType,
    payload: dict[str, Any],
    now: datetime,
) -> None:
    conn.execute(
        insert(order_events).values(
            order_id=order_id, seq=seq, type=event, payload=payload, occurred_at=now
        )
    )


def _prices_of_known_products(conn: Connection, cmd: PlaceOrder) -> dict[str, Decimal]:
    """The unit price of each product ordered; InvalidOrderError names what is unknown."""
    customer_known = exists().where(customers.c.id == cmd.customer_id)
    rows = conn.execute(
        select(products.c.id, products.c.unit_price, customer_known.label("customer_known")).where(
            products.c.id.in_([line.product_id for line in cmd.lines])
        )
    ).all()
    known = rows[0].customer_known if rows else conn.execute(select(customer_known)).scalar_one()
    errors: list[dict[str, Any]] = []
    if not known:
        errors.append({"loc": "customer_id", "msg": f"unknown customer {cmd.customer_id!r}"})
    prices = {row.id: row.unit_price for row in rows}
    errors += [
        {"loc": f"lines.{n}.product_id", "msg": f"unknown product {line.product_id!r}"}
        for n, line in enumerate(cmd.lines)
        if line.product_id not in prices
    ]
    if errors:
        raise InvalidOrderError("the order refers to unknown customers or products", errors)
    return prices


def _claim_idempotency_key(
    conn: Connection, cmd: PlaceOrder, order_id: UUID, now: datetime
) -> Accepted | None:
    """Claim the key for this new order, or return the order it already names.

    A concurrent request holding the same key makes this wait for its commit."""
    claimed = conn.execute(
        pg_insert(idempotency_keys)
        .values(
            client=cmd.client,
            key=cmd.idempotency_key,
            fingerprint=cmd.fingerprint(),
            order_id=order_id,
            created_at=now,
        )
        .on_conflict_do_nothing()
        .returning(literal(1))
    ).first()
    if claimed is not None:
        return None
    earlier = conn.execute(
        select(idempotency_keys.c.fingerprint, orders.c.id, orders.c.saga_id)
        .join(orders, orders.c.id == idempotency_keys.c.order_id)
        .where(idempotency_keys.c.client == cmd.client)
        .where(idempotency_keys.c.key == cmd.idempotency_key)
    ).one()
    if earlier.fingerprint != cmd.fingerprint():
        raise IdempotencyKeyReusedError(
            "this Idempotency-Key was already used for a different request"
        )
    return Accepted(order_id=earlier.id, saga_id=earlier.saga_id, replayed=True)
