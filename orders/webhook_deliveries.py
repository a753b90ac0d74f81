"""The webhook outbox: one delivery per final state of an order and endpoint of the key
that placed it, written by an event consumer in the transaction that moves its
position (so once per event), then sent by the webhooks lane (workers.webhooks) at
least once, with backoff, until the receiver answers 2xx or the attempts run out.

A delivery is PENDING (due at ``next_attempt_at``), DELIVERED, or DEAD (its attempts
used up; a dead letter replays it). While an attempt is under way the delivery stays
PENDING with ``next_attempt_at`` moved past the attempt's lease: a sender that dies
mid-attempt leaves it due again when the lease ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import Connection, Engine, Uuid, and_, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert

from config.ids import new_id
from orders.domain import EventType, OrderStatus
from orders.events import Event
from orders.tables import (
    order_events,
    orders,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)

_o, _w, _d, _a = orders.c, webhook_endpoints.c, webhook_deliveries.c, webhook_attempts.c

PENDING, DELIVERED, DEAD = "PENDING", "DELIVERED", "DEAD"
#: Longest error text kept per attempt.
MAX_ERROR = 500

#: The refund's event (issue 13), by its name until the domain declares it.
ORDER_REFUNDED = str(getattr(EventType, "ORDER_REFUNDED", "OrderRefunded"))
#: The events that end a state worth announcing: the webhook's type, the order's status.
FINAL_EVENTS: dict[str, tuple[str, str]] = {
    EventType.ORDER_CONFIRMED.value: ("order.confirmed", OrderStatus.CONFIRMED.value),
    EventType.ORDER_CANCELLED.value: ("order.cancelled", OrderStatus.CANCELLED.value),
    EventType.ORDER_COMPENSATION_FAILED.value: (
        "order.compensation_failed",
        OrderStatus.COMPENSATION_FAILED.value,
    ),
    ORDER_REFUNDED: ("order.refunded", "REFUNDED"),
}

_placed = order_events.alias("placed")
#: The active endpoints of the keys that placed these orders, with what a body needs.
_WATCHERS = (
    select(
        _o.id,
        _o.customer_id,
        _o.total,
        _w.id.label("endpoint_id"),
        _w.created_at.label("endpoint_created_at"),
    )
    .select_from(
        orders.join(
            _placed,
            and_(
                _placed.c.order_id == _o.id,
                _placed.c.seq == 1,
                _placed.c.placed_at == _o.created_at,  # the partition key: one month read
            ),
        ).join(
            webhook_endpoints,
            and_(_w.key_id == _placed.c.payload["client"].astext, _w.disabled_at.is_(None)),
        )
    )
    .where(_o.id == func.any(bindparam("ids", type_=ARRAY(Uuid))))
)


def event_id(order_id: UUID, seq: int) -> str:
    """The stable id of an order's event as receivers see it (``webhook-id``)."""
    return f"evt_{order_id.hex}_{seq}"


class WebhookOutbox:
    """The event consumer that turns final states into deliveries. An endpoint hears
    of what happens after it was registered, never of an older history."""

    name = "webhooks"

    def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        """Add a delivery per final event and endpoint of its order's key (one select,
        one insert; a delivery already there is left alone)."""
        final = [event for event in events if event.type in FINAL_EVENTS]
        if not final:
            return
        watchers = conn.execute(_WATCHERS, {"ids": list({e.order_id for e in final})}).all()
        if not watchers:
            return
        by_order: dict[UUID, list[Any]] = {}
        for row in watchers:
            by_order.setdefault(row.id, []).append(row)
        now = datetime.now(UTC)
        rows = [
            _delivery(event, row, now)
            for event in final
            for row in by_order.get(event.order_id, [])
            if row.endpoint_created_at <= event.occurred_at
        ]
        if rows:
            conn.execute(
                insert(webhook_deliveries)
                .values(rows)
                .on_conflict_do_nothing(index_elements=[_d.endpoint_id, _d.event_id])
            )


def _delivery(event: Event, order: Any, now: datetime) -> dict[str, Any]:
    kind, status = FINAL_EVENTS[event.type]
    ident = event_id(event.order_id, event.seq)
    total: Decimal = order.total
    payload = {
        "id": ident,
        "type": kind,
        "timestamp": event.occurred_at.isoformat(),
        "data": {
            "order_id": str(event.order_id),
            "customer_id": order.customer_id,
            "status": status,
            "reason": event.payload.get("reason"),
            "total": f"{total:.2f}",
            "seq": event.seq,
        },
    }
    return {
        "id": new_id(),
        "endpoint_id": order.endpoint_id,
        "event_id": ident,
        "order_id": event.order_id,
        "event_type": kind,
        "payload": payload,
        "state": PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }


@dataclass(frozen=True)
class Claimed:
    """A delivery taken for one attempt, with what sending it needs."""

    id: UUID
    event_id: str
    payload: dict[str, Any]
    attempts: int
    replayed: bool
    url: str
    secret: str
    previous_secret: str | None
    previous_expires_at: datetime | None


_due = (
    select(_d.id)
    .join(webhook_endpoints, _w.id == _d.endpoint_id)
    .where(_d.state == PENDING, _d.next_attempt_at <= bindparam("now"))
    # A deleted endpoint's deliveries are not sent (nor in the way of the others').
    .where(_w.disabled_at.is_(None))
    .order_by(_d.next_attempt_at)
    .limit(bindparam("n"))
    .with_for_update(of=webhook_deliveries, skip_locked=True)
)
_CLAIM = (
    update(webhook_deliveries)
    .where(_d.id.in_(_due))
    .where(_d.endpoint_id == _w.id)
    .values(next_attempt_at=bindparam("lease_until"), updated_at=bindparam("now"))
    .returning(
        _d.id,
        _d.event_id,
        _d.payload,
        _d.attempts,
        _d.replayed_at,
        _w.url,
        _w.secret,
        _w.previous_secret,
        _w.previous_expires_at,
    )
)


def claim_due(engine: Engine, limit: int, lease: timedelta) -> list[Claimed]:
    """Take up to ``limit`` due deliveries of active endpoints for an attempt each: they
    are due again when ``lease`` has passed unless their attempt is recorded first.
    Concurrent senders take different deliveries (SKIP LOCKED)."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        rows = conn.execute(_CLAIM, {"now": now, "n": limit, "lease_until": now + lease}).all()
    return [
        Claimed(
            row.id,
            row.event_id,
            row.payload,
            row.attempts,
            row.replayed_at is not None,
            row.url,
            row.secret,
            row.previous_secret,
            row.previous_expires_at,
        )
        for row in rows
    ]


@dataclass(frozen=True)
class Outcome:
    """What one attempt got: a status code, or an error instead."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        """A 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


def record_attempt(
    conn: Connection, claimed: Claimed, outcome: Outcome, *, max_attempts: int, retry_in: float
) -> str:
    """Log the attempt and move the delivery on: DELIVERED on a 2xx, PENDING again in
    ``retry_in`` seconds, or DEAD when this was attempt ``max_attempts``. Returns the
    new state."""
    now = datetime.now(UTC)
    attempts = claimed.attempts + 1
    error = outcome.error[:MAX_ERROR] if outcome.error else None
    if outcome.status_code is not None and not outcome.delivered and error is None:
        error = f"the receiver answered {outcome.status_code}"
    conn.execute(
        webhook_attempts.insert().values(
            delivery_id=claimed.id,
            attempted_at=now,
            status_code=outcome.status_code,
            error=None if outcome.delivered else error,
            duration_ms=outcome.duration_ms,
        )
    )
    values: dict[str, Any] = {
        "attempts": attempts,
        "last_status": outcome.status_code,
        "last_error": None if outcome.delivered else error,
        "updated_at": now,
    }
    if outcome.delivered:
        state = DELIVERED
        values.update(state=state, delivered_at=now)
    elif attempts >= max_attempts:
        state = DEAD
        values.update(state=state)
    else:
        state = PENDING
        values.update(next_attempt_at=now + timedelta(seconds=retry_in))
    # Only a pending delivery moves (not one a replay or another sender moved meanwhile).
    moved = conn.execute(
        update(webhook_deliveries)
        .where(_d.id == claimed.id, _d.state == PENDING)
        .values(values)
        .returning(_d.id)
    ).first()
    if moved is None:
        current: str = conn.execute(select(_d.state).where(_d.id == claimed.id)).scalar_one()
        return current
    return state


def rearm(conn: Connection, delivery_id: UUID) -> bool:
    """Hand a DEAD delivery back to the sender, due now with its attempts counted from
    zero (its log is kept). False when it is not DEAD."""
    now = datetime.now(UTC)
    done = conn.execute(
        update(webhook_deliveries)
        .where(_d.id == delivery_id, _d.state == DEAD)
        .values(state=PENDING, attempts=0, next_attempt_at=now, replayed_at=now, updated_at=now)
    )
    return done.rowcount == 1


#: Attempts shown per delivery in a log.
MAX_ATTEMPTS_SHOWN = 20


def list_deliveries(
    engine: Engine, key_id: str, endpoint_id: UUID, limit: int
) -> list[dict[str, Any]] | None:
    """The endpoint's latest deliveries, newest first, each with its attempts (the
    last MAX_ATTEMPTS_SHOWN); None when the key has no such endpoint."""
    with engine.connect() as conn:
        owned = conn.execute(select(_w.id).where(_w.id == endpoint_id, _w.key_id == key_id)).first()
        if owned is None:
            return None
        rows = conn.execute(
            select(webhook_deliveries)
            .where(_d.endpoint_id == endpoint_id)
            .order_by(_d.created_at.desc(), _d.id)
            .limit(limit)
        ).all()
        tries: dict[UUID, list[dict[str, Any]]] = {row.id: [] for row in rows}
        if rows:
            for attempt in conn.execute(
                select(webhook_attempts)
                .where(_a.delivery_id == func.any(bindparam("ids", type_=ARRAY(Uuid))))
                .order_by(_a.delivery_id, _a.id),
                {"ids": list(tries)},
            ):
                tries[attempt.delivery_id].append(
                    {
                        "attempted_at": attempt.attempted_at.isoformat(),
                        "status_code": attempt.status_code,
                        "error": attempt.error,
                        "duration_ms": attempt.duration_ms,
                    }
                )
    return [
        {
            "id": str(row.id),
            "event_id": row.event_id,
            "event_type": row.event_type,
            "order_id": str(row.order_id),
            "state": row.state,
            "attempts": row.attempts,
            "last_status": row.last_status,
            "last_error": row.last_error,
            "next_attempt_at": row.next_attempt_at.isoformat() if row.state == PENDING else None,
            "created_at": row.created_at.isoformat(),
            "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
            "attempt_log": tries[row.id][-MAX_ATTEMPTS_SHOWN:],
        }
        for row in rows
    ]


class DeliveryNotFoundError(LookupError):
    """The key has no such delivery."""


class DeliveryNotDeadError(ValueError):
    """Only a DEAD delivery can be replayed."""


def replay(engine: Engine, key_id: str, delivery_id: UUID) -> None:
    """Send a DEAD delivery of the key's again (its dead letter is resolved once it is
    delivered). DeliveryNotFoundError, DeliveryNotDeadError."""
    with engine.begin() as conn:
        state = conn.execute(
            select(_d.state)
            .join(webhook_endpoints, _w.id == _d.endpoint_id)
            .where(_d.id == delivery_id, _w.key_id == key_id)
            .with_for_update(of=webhook_deliveries)
        ).scalar()
        if state is None:
            raise DeliveryNotFoundError(f"no delivery {delivery_id}")
        if state != DEAD or not rearm(conn, delivery_id):
            raise DeliveryNotDeadError(f"delivery {delivery_id} is {state}, not DEAD")
