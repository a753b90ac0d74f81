"""The order use cases: accept an order, confirm it, cancel it, refund it (the requests
to cancel or refund are orders.lifecycle's)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Integer,
    Numeric,
    String,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from config.database import prepared
from config.failpoints import failpoint
from config.ids import new_id
from config.logs import bind_log_context
from orders import credit, inventory
from orders.domain import (
    MAX_AMOUNT,
    CancelReason,
    EventType,
    OrderStatus,
    PlaceOrder,
    order_total,
    statuses_before,
)
from orders.errors import (
    CreditPrecheckError,
    IdempotencyKeyReusedError,
    InvalidOrderError,
    InvalidTransitionError,
)
from orders.inventory import Lines
from orders.ports import SagaStarter
from orders.tables import customers, idempotency_keys, order_events, order_lines, orders, products
from sagas.definition import SagaStart

logger = logging.getLogger(__name__)

_o, _e = orders.c, order_events.c

#: An accepted order in one statement: the order, its lines (from three arrays) and its
#: first event, OrderPlaced.
_new_order = (
    insert(orders)
    .values(
        id=bindparam("order_id"),
        customer_id=bindparam("customer_id"),
        saga_id=bindparam("saga_id"),
        status=OrderStatus.PENDING.value,
        total=bindparam("total", type_=Numeric(14, 2)),
        version=1,
        created_at=bindparam("now"),
        updated_at=bindparam("now"),
    )
    .returning(_o.id)
    .cte("new_order")
)
_new_lines = (
    func.unnest(
        bindparam("product_ids", type_=ARRAY(String)),
        bindparam("quantities", type_=ARRAY(Integer)),
        bindparam("prices", type_=ARRAY(Numeric(12, 2))),
    )
    .table_valued("product_id", "quantity", "unit_price", with_ordinality="line_no")
    .render_derived()
)
_lines_written = (
    insert(order_lines)
    .from_select(
        ["order_id", "line_no", "product_id", "quantity", "unit_price"],
        select(
            _new_order.c.id,
            _new_lines.c.line_no,
            _new_lines.c.product_id,
            _new_lines.c.quantity,
            _new_lines.c.unit_price,
        )
        # new_order is one row: every line joins it.
        .select_from(_new_order.join(_new_lines, true())),
    )
    .cte("lines_written")
)
_INSERT_ORDER = prepared(
    "accept_order",
    insert(order_events).from_select(
        ["order_id", "seq", "type", "payload", "occurred_at", "placed_at"],
        select(
            _new_order.c.id,
            literal(1),
            literal(EventType.ORDER_PLACED.value),
            bindparam("placed", type_=JSONB),
            bindparam("now"),
            # The order's created_at: the events' partition key.
            bindparam("now"),
        ).add_cte(_lines_written),
    ),
)

#: A legal status change and its event, in one statement: no row when not legal. (An
#: event that changes no status moves the order to the status it has.)
_moved = (
    update(orders)
    .where(_o.id == bindparam("order_id"))
    .where(_o.status == func.any(bindparam("allowed", type_=ARRAY(String))))
    .values(
        status=bindparam("status"),
        version=_o.version + 1,
        updated_at=bindparam("now"),
        cancel_reason=bindparam("cancel_reason"),
        problem=bindparam("problem"),
        confirmed_at=func.coalesce(
            _o.confirmed_at, bindparam("confirmed_at", type_=DateTime(timezone=True))
        ),
    )
    .returning(_o.id, _o.version, _o.created_at)
    .cte("moved")
)
_MOVE = (
    insert(order_events)
    .from_select(
        ["order_id", "seq", "type", "payload", "occurred_at", "placed_at"],
        select(
            _moved.c.id,
            _moved.c.version,
            bindparam("event"),
            bindparam("payload", type_=JSONB),
            bindparam("now"),
            # The events' partition key: the same for every event of the order, so
            # the primary key (order_id, seq, placed_at) still refuses a duplicate seq.
            _moved.c.created_at,
        ),
    )
    .returning(_e.seq)
)
#: Confirmation in one statement: stock and credit committed, status moved, event
#: appended; it reports how many products and customers it touched, and the event.
_stock_committed = inventory.COMMIT.returning(products.c.id).cte("stock_committed")
_credit_committed = credit.COMMIT.returning(*credit.FIGURES).cte("credit_committed")
_confirmed = _MOVE.cte("confirmed")
_CONFIRM = prepared(
    "confirm_order",
    select(
        select(func.count()).select_from(_stock_committed).scalar_subquery().label("stock"),
        select(func.count()).select_from(_credit_committed).scalar_subquery().label("credit"),
        select(_confirmed.c.seq).scalar_subquery().label("seq"),
        # The customer's new credit figures (for the credit cache).
        *(select(c).scalar_subquery().label(c.name) for c in _credit_committed.c),
    ),
)
#: The unit price of each product ordered, and whether the customer is known.
_PRICES = prepared(
    "order_prices",
    select(
        products.c.id,
        products.c.unit_price,
        exists().where(customers.c.id == bindparam("customer_id")).label("customer_known"),
    ).where(products.c.id == func.any(bindparam("ids", type_=ARRAY(String)))),
)
_CUSTOMER_KNOWN = select(exists().where(customers.c.id == bindparam("customer_id")))


@dataclass(frozen=True)
class Accepted:
    """An accepted order: its ids, and whether this answers a retried request."""

    order_id: UUID
    saga_id: UUID
    #: True when the Idempotency-Key named an order accepted earlier.
    replayed: bool = False


def place_order(
    engine: Engine,
    cmd: PlaceOrder,
    starter: SagaStarter,
    precheck: Callable[[Connection, str, Decimal], Decimal | None] | None = None,
) -> Accepted:
    """Accept an order and start its saga.

    ``precheck`` (the credit pre-check, given this transaction's connection) returns the
    customer's available credit when it cannot cover the order's total, None when it
    can; the order is then refused with CreditPrecheckError. The saga's reservation
    still decides for the orders it lets by.

    The order, its lines, its first event and the saga's outbox entry commit in one
    transaction; the saga is dispatched after the commit. Raises InvalidOrderError or
    IdempotencyKeyReusedError, and then nothing is written."""
    now = datetime.now(UTC)
    order_id, saga_id = new_id(), new_id()
    bind_log_context(order_id=order_id, saga_id=saga_id)
    with engine.begin() as conn:
        if cmd.idempotency_key is not None:
            earlier = _claim_idempotency_key(conn, cmd, order_id, now)
            if earlier is not None:
                return earlier
        prices = _prices_of_known_products(conn, cmd)
        total = order_total(cmd.lines, prices)
        if total > MAX_AMOUNT:
            raise InvalidOrderError(
                "the order's total is larger than an order can hold",
                [{"loc": "lines", "msg": f"total {total} exceeds {MAX_AMOUNT}"}],
            )
        if (
            precheck is not None
            and (available := precheck(conn, cmd.customer_id, total)) is not None
        ):
            raise CreditPrecheckError(
                "the customer's available credit does not cover the order",
                [{"loc": "customer_id", "msg": f"total {total}, available {available}"}],
            )
        conn.execute(
            _INSERT_ORDER,
            {
                "order_id": order_id,
                "customer_id": cmd.customer_id,
                "saga_id": saga_id,
                "total": total,
                "now": now,
                "product_ids": [line.product_id for line in cmd.lines],
                "quantities": [line.quantity for line in cmd.lines],
                "prices": [prices[line.product_id] for line in cmd.lines],
                # The key that placed it: whose webhooks hear of its final states.
                "placed": {"total": str(total), "client": cmd.client},
            },
        )
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
    logger.info("order accepted: %d lines, total %s", len(cmd.lines), total)
    return Accepted(order_id=order_id, saga_id=saga_id)


def confirm_order(
    conn: Connection, order_id: UUID, lines: Lines, customer_id: str, amount: Decimal
) -> credit.CreditFigures:
    """Confirm a pending order: its reserved stock and credit become stock gone and
    credit used, its status CONFIRMED, its event OrderConfirmed; one statement. Returns
    the customer's new credit figures."""
    done = conn.execute(
        _CONFIRM,
        {
            **inventory.arrays(lines),
            # Not "customer_id": in an UPDATE of orders that name would also set the column.
            "account": customer_id,
            "amount": amount,
            **_move_parameters(order_id, OrderStatus.CONFIRMED, EventType.ORDER_CONFIRMED, {}),
        },
    ).one()
    if done.seq is None:
        raise InvalidTransitionError(f"order {order_id} cannot become CONFIRMED")
    if (done.stock, done.credit) != (len(lines), 1):
        raise LookupError(
            f"order {order_id}: confirmation touched {done.stock} products, {done.credit} customers"
        )
    return credit.CreditFigures(
        done.id, done.credit_limit, done.credit_used, done.credit_reserved, done.credit_version
    )


def cancel_order(conn: Connection, order_id: UUID, reason: CancelReason | str) -> None:
    """Mark the order cancelled with its reason and append OrderCancelled."""
    _move(
        conn,
        order_id,
        OrderStatus.CANCELLED,
        EventType.ORDER_CANCELLED,
        {"reason": str(reason)},
        cancel_reason=str(reason),
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


def mark_refunded(conn: Connection, order_id: UUID, payload: dict[str, Any]) -> None:
    """The refund completed: the confirmed order becomes REFUNDED, event OrderRefunded."""
    _move(conn, order_id, OrderStatus.REFUNDED, EventType.ORDER_REFUNDED, payload)


def append_event(
    conn: Connection, order_id: UUID, status: OrderStatus, event: EventType, payload: dict[str, Any]
) -> None:
    """Append an event that changes no status to an order that is ``status``
    (InvalidTransitionError when it is not). It clears the order's problem."""
    parameters = _move_parameters(order_id, status, event, payload)
    parameters["allowed"] = [status.value]
    if conn.execute(_MOVE, parameters).scalar_one_or_none() is None:
        raise InvalidTransitionError(f"order {order_id} is not {status}")


def refund_failed(conn: Connection, order_id: UUID, refund_saga_id: UUID, reason: str) -> None:
    """The refund was refused or failed, and what it returned was taken back: the order
    stays CONFIRMED (event OrderRefundFailed) and may be refunded again."""
    append_event(
        conn,
        order_id,
        OrderStatus.CONFIRMED,
        EventType.ORDER_REFUND_FAILED,
        {"reason": reason, "refund_saga_id": str(refund_saga_id)},
    )
    conn.execute(
        update(orders)
        .where(orders.c.id == order_id, orders.c.refund_saga_id == refund_saga_id)
        .values(refund_saga_id=None)
    )


def note_problem(conn: Connection, order_id: UUID, problem: str) -> None:
    """Show on the order what holds it up (a refund whose undoing failed), without an
    event: the problem is cleared by the order's next event."""
    conn.execute(
        update(orders)
        .where(orders.c.id == order_id)
        .values(problem=problem, updated_at=datetime.now(UTC))
    )


def _move(
    conn: Connection,
    order_id: UUID,
    status: OrderStatus,
    event: EventType,
    payload: dict[str, Any],
    *,
    cancel_reason: str | None = None,
    problem: str | None = None,
) -> None:
    """Change the order's status if the transition is legal, and append its event."""
    parameters = _move_parameters(order_id, status, event, payload, cancel_reason, problem)
    if conn.execute(_MOVE, parameters).scalar_one_or_none() is None:
        raise InvalidTransitionError(f"order {order_id} cannot become {status}")


def _move_parameters(
    order_id: UUID,
    status: OrderStatus,
    event: EventType,
    payload: dict[str, Any],
    cancel_reason: str | None = None,
    problem: str | None = None,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "order_id": order_id,
        "status": status.value,
        "allowed": [old.value for old in statuses_before(status)],
        "cancel_reason": cancel_reason,
        "problem": problem,
        "now": now,
        # Kept once set: only the confirmation sets it.
        "confirmed_at": now if status is OrderStatus.CONFIRMED else None,
        "event": event.value,
        "payload": payload,
    }


def _prices_of_known_products(conn: Connection, cmd: PlaceOrder) -> dict[str, Decimal]:
    """The unit price of each product ordered; InvalidOrderError names what is unknown."""
    rows = conn.execute(
        _PRICES, {"customer_id": cmd.customer_id, "ids": [line.product_id for line in cmd.lines]}
    ).all()
    known = (
        rows[0].customer_known
        if rows
        else conn.execute(_CUSTOMER_KNOWN, {"customer_id": cmd.customer_id}).scalar_one()
    )
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
