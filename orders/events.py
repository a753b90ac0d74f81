"""Consumers of the order events: each applies every event once, in each order's seq order.

The log is ``order_events``: per order, seq 1, 2, 3... written in the transaction that
changed the order; across orders, ``id`` numbers the events in the order they were
written, which is the consumers' feed. A consumer keeps

- a checkpoint: the feed id it has read up to (``consumer_checkpoints``; its row lock also
  makes one instance of a consumer work at a time), and
- a position per order: the last seq it applied (``consumer_positions``), written in the
  transaction of the consumer's effect.

Given events, a consumer applies for each order the one whose seq is its position + 1,
then the next...; an event at or below the position is a duplicate or old and is skipped;
an event past a missing one (a gap) stops that order. The feed is read again from the
checkpoint, which does not move past a blocked event or a hole in the ids (a transaction
that has not committed yet) while they are recent (``hold``); past that, the integrity
check (``repair``, run by beat) compares every position with the log and applies the
missing range.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from prometheus_client import Counter
from sqlalchemy import Connection, Engine, Uuid, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert

from orders.db import transaction
from orders.tables import consumer_checkpoints, consumer_positions, order_events, orders

logger = logging.getLogger(__name__)

_e, _p, _k = order_events.c, consumer_positions.c, consumer_checkpoints.c

EVENTS = Counter(
    "orders_consumer_events_total",
    "Events given to a consumer, by what became of them (applied, duplicate, blocked).",
    ["consumer", "result"],
)
GAPS = Counter(
    "orders_consumer_gaps_total",
    "Orders found behind the log, by who found them (feed: waiting; check: repaired).",
    ["consumer", "found_by"],
)


@dataclass(frozen=True)
class Event:
    """One event of an order's log."""

    id: int
    order_id: UUID
    seq: int
    type: str
    payload: dict[str, Any]
    occurred_at: datetime


class Consumer(Protocol):
    """What a consumer does with events."""

    #: Its name in the checkpoints and positions (stable: renaming starts it over).
    name: str

    def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        """Apply these events in the transaction of ``conn``: each is new to this
        consumer, and each order's come in seq order. Raising rolls back the batch; it
        is given again later."""


@dataclass
class Tally:
    """What one pass did."""

    read: int = 0
    applied: int = 0
    duplicates: int = 0
    #: Orders that stopped at a gap, and the events held behind it.
    gaps: int = 0
    blocked: list[Event] = field(default_factory=list)
    #: Orders whose position moved.
    moved: int = 0
    #: Where the consumer's checkpoint is after the pass (``consume`` only).
    checkpoint: int | None = None

    def count(self, consumer: str) -> None:
        """Add to the metrics."""
        EVENTS.labels(consumer, "applied").inc(self.applied)
        EVENTS.labels(consumer, "duplicate").inc(self.duplicates)
        EVENTS.labels(consumer, "blocked").inc(len(self.blocked))


_COLUMNS = (_e.id, _e.order_id, _e.seq, _e.type, _e.payload, _e.occurred_at)
_FEED = select(*_COLUMNS).where(_e.id > bindparam("after")).order_by(_e.id).limit(bindparam("n"))
_POSITIONS = (
    select(_p.order_id, _p.last_seq)
    .where(_p.consumer == bindparam("consumer"))
    .where(_p.order_id == func.any(bindparam("ids", type_=ARRAY(Uuid))))
)
_BEHIND = (
    select(orders.c.id, func.coalesce(_p.last_seq, 0).label("position"))
    .select_from(
        orders.outerjoin(
            consumer_positions,
            (_p.order_id == orders.c.id) & (_p.consumer == bindparam("consumer")),
        )
    )
    .where(orders.c.version > func.coalesce(_p.last_seq, 0))
    .where(orders.c.updated_at < bindparam("settled_before"))
    .limit(bindparam("n"))
)
_LOG_OF = (
    select(*_COLUMNS)
    .where(_e.order_id == func.any(bindparam("ids", type_=ARRAY(Uuid))))
    .order_by(_e.order_id, _e.seq)
)


def deliver(engine: Engine, consumer: Consumer, events: Sequence[Event]) -> Tally:
    """Give events (a batch of a feed, in any order, maybe repeated) to the consumer in
    one transaction: what comes next for each order is applied, duplicates and old
    events are skipped, an order stops at a gap."""
    with transaction(engine) as conn:
        _lock_checkpoint(conn, consumer.name, wait=True)
        tally = _deliver(conn, consumer, events)
    if tally.gaps:
        GAPS.labels(consumer.name, "feed").inc(tally.gaps)
    tally.count(consumer.name)
    return tally


def _deliver(conn: Connection, consumer: Consumer, events: Sequence[Event]) -> Tally:
    """``deliver`` in the caller's transaction, which holds the consumer's checkpoint
    lock: the new positions commit with the consumer's effect."""
    tally = Tally(read=len(events))
    by_order: dict[UUID, dict[int, Event]] = defaultdict(dict)
    for event in events:
        by_order[event.order_id][event.seq] = event
    tally.duplicates = len(events) - sum(len(seqs) for seqs in by_order.values())
    if not by_order:
        return tally
    positions = dict(
        conn.execute(_POSITIONS, {"consumer": consumer.name, "ids": list(by_order)}).all()
    )
    due: list[Event] = []
    moved: dict[UUID, int] = {}
    for order_id, seqs in by_order.items():
        position = start = positions.get(order_id, 0)
        for seq in sorted(seqs):
            if seq <= position:
                tally.duplicates += 1
            elif seq == position + 1:
                due.append(seqs[seq])
                position = seq
            else:
                tally.gaps += 1
                tally.blocked += [seqs[s] for s in sorted(seqs) if s >= seq]
                break
        if position != start:
            moved[order_id] = position
    if due:
        consumer.apply(conn, due)
        upsert = insert(consumer_positions).values(
            [{"consumer": consumer.name, "order_id": o, "last_seq": s} for o, s in moved.items()]
        )
        conn.execute(
            upsert.on_conflict_do_update(
                index_elements=[_p.consumer, _p.order_id],
                set_={"last_seq": upsert.excluded.last_seq},
            )
        )
    tally.applied, tally.moved = len(due), len(moved)
    return tally


def consume(
    engine: Engine,
    consumer: Consumer,
    *,
    limit: int = 500,
    hold: float = 5.0,
    seen: dict[int, datetime] | None = None,
) -> Tally:
    """Read the feed after the checkpoint and deliver it; move the checkpoint past what
    was read, but not past a recent hole or a recently blocked event. Returns an empty
    tally when another instance of the consumer is at work.

    An event past a hole or blocked at a gap waits (the checkpoint stays below it) while
    it was written less than ``hold`` seconds ago; with ``seen`` (kept by the caller from
    pass to pass) also while this consumer first saw it waiting less than ``hold`` ago,
    whatever its time stamp says (a transaction may stamp its event, then wait on a
    lock, then commit). Every waiting event of a pass is noted at once, so holes close
    together are waited for together."""
    now = datetime.now(UTC)
    with transaction(engine) as conn:
        checkpoint = _lock_checkpoint(conn, consumer.name, wait=False)
        if checkpoint is None:
            return Tally()
        rows = conn.execute(_FEED, {"after": checkpoint, "n": limit}).all()
        events = [Event(*row) for row in rows]
        tally = _deliver(conn, consumer, events)
        blocked = {event.id for event in tally.blocked}
        waiting, previous = set(), checkpoint
        for event in events:
            if event.id in blocked or event.id != previous + 1:
                waiting.add(event.id)
                if seen is not None:
                    seen.setdefault(event.id, now)  # all of a batch's holes age together
            previous = event.id
        recent = now - timedelta(seconds=hold)
        reached = checkpoint
        for event in events:
            if event.id in waiting and _recent(event, recent, seen):
                break
            reached = event.id
        if seen:
            for passed in [i for i in seen if i <= reached]:
                del seen[passed]
        if reached != checkpoint:
            conn.execute(
                update(consumer_checkpoints)
                .where(_k.consumer == consumer.name)
                .values(last_id=reached, updated_at=now)
            )
        tally.checkpoint = reached
    if tally.gaps:
        GAPS.labels(consumer.name, "feed").inc(tally.gaps)
    tally.count(consumer.name)
    return tally


def _recent(event: Event, recent: datetime, seen: dict[int, datetime] | None) -> bool:
    """Whether a waiting event is still held: written, or first seen, since ``recent``."""
    first_seen = seen[event.id] if seen is not None else event.occurred_at
    return max(event.occurred_at, first_seen) > recent


def repair(engine: Engine, consumer: Consumer, *, hold: float = 5.0, batch: int = 1000) -> Tally:
    """The integrity check: find orders whose log goes past the consumer's position
    (and that changed more than ``hold`` ago: the feed has had its chance), and apply
    their missing range from the log, ``batch`` orders per transaction. Returns what it
    applied; ``gaps`` counts the orders it brought up to their log."""
    settled_before = datetime.now(UTC) - timedelta(seconds=hold)
    total = Tally()
    while True:
        # Found without the checkpoint's lock (a scan of the orders: the feed goes on
        # meanwhile); the positions are read again under the lock by _deliver.
        with engine.connect() as conn:
            behind = dict(
                conn.execute(
                    _BEHIND,
                    {"consumer": consumer.name, "settled_before": settled_before, "n": batch},
                ).all()
            )
        if not behind:
            break
        with transaction(engine) as conn:
            _lock_checkpoint(conn, consumer.name, wait=True)
            rows = conn.execute(_LOG_OF, {"ids": list(behind)}).all()
            missing = [Event(*row) for row in rows if row.seq > behind[row.order_id]]
            tally = _deliver(conn, consumer, missing)
        tally.count(consumer.name)
        total.read += tally.read
        total.applied += tally.applied
        total.gaps += tally.moved  # not those the feed caught up with meanwhile
        total.blocked += tally.blocked
        if tally.applied == 0 or len(behind) < batch:
            break  # what is left cannot move (a hole in the log itself)
    if total.gaps:
        GAPS.labels(consumer.name, "check").inc(total.gaps)
        logger.warning(
            "integrity check: %d orders behind for %s; %d events applied",
            total.gaps,
            consumer.name,
            total.applied,
        )
    return total


class CheckFailed(Exception):
    """The integrity check failed for some consumers (the others were checked)."""


def check_all(
    engine: Engine, consumers: Sequence[Consumer], *, hold: float = 5.0
) -> dict[str, int]:
    """The integrity check of every consumer; one failing (its cache down, say) does not
    keep the others from being repaired. Returns the events applied per consumer; raises
    CheckFailed, after checking the others, when some failed."""
    applied: dict[str, int] = {}
    failed: list[str] = []
    for consumer in consumers:
        try:
            applied[consumer.name] = repair(engine, consumer, hold=hold).applied
        except Exception:
            logger.exception("integrity check of %s failed", consumer.name)
            failed.append(consumer.name)
    if failed:
        raise CheckFailed(f"integrity check failed for {', '.join(failed)}; applied {applied}")
    return applied


def newest(engine: Engine) -> int:
    """The id of the newest event (0 for none): one index lookup, to skip idle passes."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.coalesce(func.max(_e.id), 0))).scalar_one())


def lag(engine: Engine, consumer_name: str) -> int:
    """Events in the feed past the consumer's checkpoint (not yet applied)."""
    with engine.connect() as conn:
        checkpoint = conn.execute(select(_k.last_id).where(_k.consumer == consumer_name)).scalar()
        return int(
            conn.execute(
                select(func.count()).select_from(order_events).where(_e.id > (checkpoint or 0))
            ).scalar_one()
        )


def _lock_checkpoint(conn: Connection, name: str, *, wait: bool) -> int | None:
    conn.execute(
        insert(consumer_checkpoints)
        .values(consumer=name, last_id=0, updated_at=datetime.now(UTC))
        .on_conflict_do_nothing()
    )
    query = select(_k.last_id).where(_k.consumer == name)
    query = query.with_for_update() if wait else query.with_for_update(skip_locked=True)
    checkpoint: int | None = conn.execute(query).scalar()
    return checkpoint
