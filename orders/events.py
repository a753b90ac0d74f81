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
check (``repair``, run by beat) compares positions with the log and applies the missing
range.

The check costs what changed recently, not the history. Every event moves its order's
``version`` and ``updated_at`` in the same statement, so an order a consumer is behind
on is one whose ``updated_at`` is no older than the event it missed. Each pass looks at
the orders changed since the previous pass ended, and a margin before that (a
transaction that stamped its change, then committed late; clocks apart), through the
index on ``orders(updated_at, id)``. An event whose transaction committed more than the
margin after it was stamped is beyond the passes: a slow sweep goes round every order,
a small batch per run, and finds it within one round. Each run looks at no more than a
set number of orders (the rest waits for the next run), and keeps where it is in
``consumer_checks``.
"""

from __future__ import annotations

import logging
import operator
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

from prometheus_client import Counter
from sqlalchemy import Connection, Engine, Uuid, bindparam, func, select, true, tuple_, update
from sqlalchemy.dialects.postgresql import ARRAY, insert

from config.database import prepared, single_statements, transaction
from orders.tables import (
    consumer_checkpoints,
    consumer_checks,
    consumer_positions,
    order_events,
    orders,
)

logger = logging.getLogger(__name__)

_e, _p, _k, _o, _c = (
    order_events.c,
    consumer_positions.c,
    consumer_checkpoints.c,
    orders.c,
    consumer_checks.c,
)

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
    #: Orders the integrity check looked at (``repair`` only).
    examined: int = 0

    def count(self, consumer: str) -> None:
        """Add to the metrics."""
        EVENTS.labels(consumer, "applied").inc(self.applied)
        EVENTS.labels(consumer, "duplicate").inc(self.duplicates)
        EVENTS.labels(consumer, "blocked").inc(len(self.blocked))


_COLUMNS = (_e.id, _e.order_id, _e.seq, _e.type, _e.payload, _e.occurred_at)
_FEED = prepared(
    "event_feed",
    select(*_COLUMNS).where(_e.id > bindparam("after")).order_by(_e.id).limit(bindparam("n")),
)
#: The newest event's id (0 for none).
_NEWEST = prepared("newest_event", select(func.coalesce(func.max(_e.id), 0)))
#: How many events are past a checkpoint.
_PAST = prepared(
    "events_past", select(func.count()).select_from(order_events).where(_e.id > bindparam("after"))
)
_CHECKPOINT = select(_k.last_id).where(_k.consumer == bindparam("consumer"))
#: A consumer's checkpoint, its row locked, waiting for the lock or not.
_LOCK_CHECKPOINT = prepared("lock_checkpoint", _CHECKPOINT.with_for_update())
_TRY_CHECKPOINT = prepared("try_lock_checkpoint", _CHECKPOINT.with_for_update(skip_locked=True))
_POSITIONS = (
    select(_p.order_id, _p.last_seq)
    .where(_p.consumer == bindparam("consumer"))
    .where(_p.order_id == func.any(bindparam("ids", type_=ARRAY(Uuid))))
)


def _by_change(bound: str) -> Any:
    """The key of an order in a pass over recent changes, and a bound of it."""
    return tuple_(_o.updated_at, _o.id), tuple_(bindparam(f"{bound}_at"), bindparam(f"{bound}_id"))


#: The next page of a pass over recent changes, and of the sweep round all orders.
_RECENT_PAGE = (
    select(_o.updated_at, _o.id)
    .where(operator.gt(*_by_change("after")))
    .where(_o.updated_at < bindparam("until"))
    .order_by(_o.updated_at, _o.id)
    .limit(bindparam("n"))
)
_SWEEP_PAGE = (
    select(_o.id).where(_o.id > bindparam("after_id")).order_by(_o.id).limit(bindparam("n"))
)
#: An order's position, one index probe per order (LIMIT keeps the planner from turning
#: it into a join that reads every position of the consumer).
_position = (
    select(_p.last_seq)
    .where(_p.consumer == bindparam("consumer"), _p.order_id == _o.id)
    .limit(1)
    .lateral("known")
)
#: Orders behind the consumer's positions among those after one key and up to another:
#: by (updated_at, id) in a pass over recent changes, by id in the sweep.
_BEHIND = (
    select(_o.id, func.coalesce(_position.c.last_seq, 0).label("position"))
    .select_from(orders.outerjoin(_position, true()))
    .where(_o.version > func.coalesce(_position.c.last_seq, 0))
    .where(_o.updated_at < bindparam("settled_before"))
)
_RECENT_BEHIND = _BEHIND.where(operator.gt(*_by_change("after"))).where(
    operator.le(*_by_change("last"))
)
_SWEEP_BEHIND = _BEHIND.where(_o.id > bindparam("after_id")).where(_o.id <= bindparam("last_id"))
#: Below every order id: where a pass or the sweep starts.
_NO_ID = UUID(int=0)
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


def repair(
    engine: Engine,
    consumer: Consumer,
    *,
    hold: float = 5.0,
    margin: float = 300.0,
    rows: int = 20_000,
    sweep_rows: int = 2_000,
    page: int = 1000,
) -> Tally:
    """The integrity check of one consumer: find orders whose log goes past the
    consumer's position (and that changed more than ``hold`` ago: the feed has had its
    chance), and apply their missing range from the log, ``page`` orders at a time.

    It goes on with its pass over the orders changed recently (from ``margin`` seconds
    before where the previous pass ended), looking at ``rows`` orders at most, then at
    the next ``sweep_rows`` orders of the sweep round all orders. Returns what it
    applied; ``gaps`` counts the orders it brought up to their log, ``examined`` the
    orders it looked at."""
    now = datetime.now(UTC)
    settled_before = now - timedelta(seconds=hold)
    state = _check_state(engine, consumer.name)
    total = Tally()
    if state.pass_until is None:  # a new pass
        began = (state.checked_until or settled_before) - timedelta(seconds=margin)
        until, after = settled_before, (began, _NO_ID)
    else:
        until, after = state.pass_until, (state.cursor_at, state.cursor_id)
    while total.examined < rows:
        n = min(page, rows - total.examined)
        with engine.connect() as conn:
            keys = conn.execute(
                _RECENT_PAGE,
                {"after_at": after[0], "after_id": after[1], "until": until, "n": n},
            ).all()
        if keys:
            last = (keys[-1].updated_at, keys[-1].id)
            found = {
                "after_at": after[0],
                "after_id": after[1],
                "last_at": last[0],
                "last_id": last[1],
            }
            _repair_behind(engine, consumer, _RECENT_BEHIND, found, settled_before, total)
            total.examined += len(keys)
            after = last
        if len(keys) < n:  # the pass is done; the next run starts the next one
            _save_check(
                engine,
                consumer.name,
                checked_until=until,
                pass_until=None,
                cursor_at=None,
                cursor_id=None,
            )
            break
        _save_check(engine, consumer.name, pass_until=until, cursor_at=after[0], cursor_id=after[1])
    if sweep_rows > 0:
        swept_after = state.swept_after or _NO_ID
        with engine.connect() as conn:
            ids = (
                conn.execute(_SWEEP_PAGE, {"after_id": swept_after, "n": sweep_rows})
                .scalars()
                .all()
            )
        if ids:
            found = {"after_id": swept_after, "last_id": ids[-1]}
            _repair_behind(engine, consumer, _SWEEP_BEHIND, found, settled_before, total)
            total.examined += len(ids)
        if len(ids) < sweep_rows:  # round every order: start over
            _save_check(engine, consumer.name, swept_after=None, swept_at=now)
        else:
            _save_check(engine, consumer.name, swept_after=ids[-1])
    if total.gaps:
        GAPS.labels(consumer.name, "check").inc(total.gaps)
        logger.warning(
            "integrity check: %d orders behind for %s; %d events applied",
            total.gaps,
            consumer.name,
            total.applied,
        )
    return total


def _repair_behind(
    engine: Engine,
    consumer: Consumer,
    query: Any,
    keys: dict[str, Any],
    settled_before: datetime,
    total: Tally,
) -> None:
    """Apply what the consumer misses of the orders ``query`` finds between ``keys``."""
    # Found without the checkpoint's lock (the feed goes on meanwhile); the positions
    # are read again under the lock by _deliver.
    with engine.connect() as conn:
        behind = dict(
            conn.execute(
                query, {**keys, "consumer": consumer.name, "settled_before": settled_before}
            ).all()
        )
    if not behind:
        return
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


def _check_state(engine: Engine, name: str) -> Any:
    """The consumer's row of ``consumer_checks`` (made when missing)."""
    with engine.begin() as conn:
        conn.execute(
            insert(consumer_checks)
            .values(consumer=name, updated_at=datetime.now(UTC))
            .on_conflict_do_nothing()
        )
        return conn.execute(select(consumer_checks).where(_c.consumer == name)).one()


def _save_check(engine: Engine, name: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(consumer_checks)
            .where(_c.consumer == name)
            .values(**values, updated_at=datetime.now(UTC))
        )


class CheckFailed(Exception):
    """The integrity check failed for some consumers (the others were checked)."""


#: The key of the session lock one integrity check holds while it runs (two at once
#: would only do the same work twice).
CHECK_LOCK = 0x6F72_6465_7273_6368


def check_all(
    engine: Engine,
    consumers: Sequence[Consumer],
    *,
    hold: float = 5.0,
    margin: float = 300.0,
    rows: int = 20_000,
    sweep_rows: int = 2_000,
) -> dict[str, int]:
    """The integrity check of every consumer (see ``repair``); one failing (its cache
    down, say) does not keep the others from being repaired. Returns the events applied
    per consumer (nothing while another check runs); raises CheckFailed, after checking
    the others, when some failed."""
    applied: dict[str, int] = {}
    failed: list[str] = []
    with engine.connect() as lock:
        # A session lock, not a transaction: nothing is held open while the check runs.
        held = lock.execute(select(func.pg_try_advisory_lock(CHECK_LOCK))).scalar()
        lock.commit()
        if not held:
            logger.info("integrity check: another one is running")
            return applied
        try:
            for consumer in consumers:
                try:
                    applied[consumer.name] = repair(
                        engine, consumer, hold=hold, margin=margin, rows=rows, sweep_rows=sweep_rows
                    ).applied
                except Exception:
                    logger.exception("integrity check of %s failed", consumer.name)
                    failed.append(consumer.name)
        finally:
            lock.execute(select(func.pg_advisory_unlock(CHECK_LOCK)))
            lock.commit()
    if failed:
        raise CheckFailed(f"integrity check failed for {', '.join(failed)}; applied {applied}")
    return applied


def newest(engine: Engine) -> int:
    """The id of the newest event (0 for none): one index lookup, to skip idle passes."""
    with single_statements(engine) as conn:
        return int(conn.execute(_NEWEST).scalar_one())


def lag(engine: Engine, consumer_name: str) -> int:
    """Events in the feed past the consumer's checkpoint (not yet applied)."""
    with single_statements(engine) as conn:
        checkpoint = conn.execute(_CHECKPOINT, {"consumer": consumer_name}).scalar()
        return int(conn.execute(_PAST, {"after": checkpoint or 0}).scalar_one())


def _lock_checkpoint(conn: Connection, name: str, *, wait: bool) -> int | None:
    """The consumer's checkpoint, its row locked (made at 0 the first time); None when
    another instance holds the lock and ``wait`` is off. A row that exists (every pass
    but a consumer's first) costs one statement."""
    query = _LOCK_CHECKPOINT if wait else _TRY_CHECKPOINT
    checkpoint: int | None = conn.execute(query, {"consumer": name}).scalar()
    if checkpoint is not None:
        return checkpoint
    conn.execute(
        insert(consumer_checkpoints)
        .values(consumer=name, last_id=0, updated_at=datetime.now(UTC))
        .on_conflict_do_nothing()
    )
    checkpoint = conn.execute(query, {"consumer": name}).scalar()
    return checkpoint
