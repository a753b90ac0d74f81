"""Retention: what is finished and old is removed, a small batch at a time, by beat.

Each run removes, per table, at most ``batches`` statements of ``rows`` rows (children
removed with their parent come on top), each statement in its own short transaction,
found through an index (migration 0013), oldest first; what is left waits for the next
run. Every rule keeps what anything still at work may read:

- sagas and their steps, ``sagas`` after their finish: CONFIRMED or CANCELLED only (a
  RUNNING saga or a COMPENSATION_FAILED one stays however old, and so does a saga whose
  order is not final). The order's saga timeline is gone with them (the API says so);
- idempotency keys, ``idempotency_keys`` after their claim: a retried POST carrying
  the key after that makes a new order (the usual practice: 24 hours). The key of an
  order not yet final stays;
- order events, ``events`` after they happened, once every consumer applied them: the
  event is at or below every consumer's checkpoint (the deployment's consumers and any
  other with a checkpoint; a consumer without one holds everything), at or below its
  position for that order in every consumer, and its order is final;
- purged dead letters, ``dead_letters`` after their purge (open and replayed ones
  stay, and so does a letter whose saga is still active);
- finished and failed batch runs and their chunks, ``batch_runs`` after their finish.

Orders and their lines are never removed: they are the record. Nor are the consumers'
positions (``consumer_positions``): a position says how far a consumer has applied an
order's log, and the integrity check takes an order without a position for one none of
whose events were applied (``orders.version`` against the position), so an order whose
positions went would be "repaired" at every check, forever, crowding out the real gaps;
and an order that gains an event later (a refund of a confirmed order) would wait at a
gap no log can fill. They can go once the check judges by the log rather than the
version and a missing position reads as "up to the first event still kept".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter
from sqlalchemy import Connection, Engine, TextClause, select, text
from sqlalchemy.dialects.postgresql import insert

from config.settings import Settings
from orders.tables import consumer_checkpoints, retention_cursors

logger = logging.getLogger(__name__)

REMOVED = Counter(
    "orders_retention_rows_removed_total",
    "Rows the retention job removed, by table.",
    ["table"],
)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each kind of row is kept (None: for ever), and how much one run removes."""

    sagas: timedelta | None
    idempotency_keys: timedelta | None
    events: timedelta | None
    dead_letters: timedelta | None
    batch_runs: timedelta | None
    #: Rows one statement removes at most.
    rows: int = 1000
    #: Statements per table and run at most.
    batches: int = 10

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        """The policy the settings describe (a period of 0 keeps for ever)."""

        def kept(days: float = 0.0, hours: float = 0.0) -> timedelta | None:
            period = timedelta(days=days, hours=hours)
            return period if period > timedelta(0) else None

        return cls(
            sagas=kept(days=settings.retain_sagas_days),
            idempotency_keys=kept(hours=settings.retain_idempotency_hours),
            events=kept(days=settings.retain_events_days),
            dead_letters=kept(days=settings.retain_dead_letters_days),
            batch_runs=kept(days=settings.retain_batch_runs_days),
            rows=settings.retention_batch_rows,
            batches=settings.retention_batches_per_run,
        )


# Each statement returns (rows removed, children removed with them).
_SAGAS = text(
    """
    WITH doomed AS (
        SELECT s.id FROM sagas s
         WHERE s.state IN ('CONFIRMED', 'CANCELLED') AND s.finished_at < :cutoff
           AND NOT EXISTS (SELECT 1 FROM orders o
                            WHERE o.saga_id = s.id
                              AND o.status NOT IN ('CONFIRMED', 'CANCELLED', 'REFUNDED'))
         ORDER BY s.finished_at
         LIMIT :n
           FOR UPDATE OF s SKIP LOCKED
    ), steps AS (
        DELETE FROM saga_steps WHERE saga_id = ANY(ARRAY(SELECT id FROM doomed)) RETURNING 1
    ), gone AS (
        DELETE FROM sagas WHERE id = ANY(ARRAY(SELECT id FROM doomed)) RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM steps)
    """
)

_IDEMPOTENCY_KEYS = text(
    """
    WITH doomed AS (
        SELECT k.ctid FROM idempotency_keys k
         WHERE k.created_at < :cutoff
           AND NOT EXISTS (SELECT 1 FROM orders o
                            WHERE o.id = k.order_id
                              AND o.status NOT IN ('CONFIRMED', 'CANCELLED', 'REFUNDED'))
         ORDER BY k.created_at
         LIMIT :n
           FOR UPDATE OF k SKIP LOCKED
    ), gone AS (
        DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(SELECT ctid FROM doomed)) RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone), 0
    """
)

_DEAD_LETTERS = text(
    """
    WITH doomed AS (
        SELECT d.id FROM dead_letters d
         WHERE d.state = 'PURGED' AND d.resolved_at < :cutoff
           AND NOT EXISTS (
               SELECT 1 FROM sagas s
                WHERE s.id IN (
                    -- the saga of a step's letter (its first argument) or of a
                    -- completion's (its second), when the argument is a uuid
                    CASE WHEN d.args ->> 0 ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$'
                         THEN (d.args ->> 0)::uuid END,
                    CASE WHEN d.args ->> 1 ~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$'
                         THEN (d.args ->> 1)::uuid END)
                  AND s.state NOT IN ('CONFIRMED', 'CANCELLED'))
         ORDER BY d.resolved_at
         LIMIT :n
           FOR UPDATE OF d SKIP LOCKED
    ), gone AS (
        DELETE FROM dead_letters WHERE id = ANY(ARRAY(SELECT id FROM doomed)) RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone), 0
    """
)

_BATCH_RUNS = text(
    """
    WITH doomed AS (
        SELECT id FROM batch_runs
         WHERE state IN ('FINISHED', 'FAILED') AND finished_at < :cutoff
         ORDER BY finished_at
         LIMIT :n
           FOR UPDATE SKIP LOCKED
    ), chunks AS (
        DELETE FROM batch_chunks WHERE run_id = ANY(ARRAY(SELECT id FROM doomed)) RETURNING 1
    ), gone AS (
        DELETE FROM batch_runs WHERE id = ANY(ARRAY(SELECT id FROM doomed)) RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM chunks)
    """
)

# Events are read in feed order (the id's index), a span at a time, from where the last
# run stopped (``retention_cursors``) up to the lowest checkpoint; of a span, those old
# enough, of a final order and applied by every consumer go. Ids grow with time: a span
# ending in a recent event is the last, and the next run starts again from the lowest id.
# The bounds of the doomed events' ``placed_at`` let the delete skip the partitions (the
# months) none of them is in.
_EVENTS = text(
    """
    WITH span AS (
        SELECT id, order_id, seq, occurred_at, placed_at FROM order_events
         WHERE id > :after AND id <= :ceiling
         ORDER BY id
         LIMIT :n
    ), doomed AS (
        SELECT s.id, s.placed_at FROM span s JOIN orders o ON o.id = s.order_id
         WHERE s.occurred_at < :cutoff AND o.status IN ('CONFIRMED', 'CANCELLED', 'REFUNDED')
           AND (SELECT count(*) FROM consumer_positions p
                 WHERE p.consumer = ANY(CAST(:consumers AS text[]))
                   AND p.order_id = s.order_id AND p.last_seq >= s.seq)
               = cardinality(CAST(:consumers AS text[]))
    ), gone AS (
        DELETE FROM order_events
         WHERE id = ANY(ARRAY(SELECT id FROM doomed))
           AND placed_at BETWEEN (SELECT min(placed_at) FROM doomed)
                             AND (SELECT max(placed_at) FROM doomed)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone),
           (SELECT count(*) FROM span),
           (SELECT id FROM span ORDER BY id DESC LIMIT 1),
           (SELECT occurred_at FROM span ORDER BY id DESC LIMIT 1)
    """
)
#: The name of the events scan's row in ``retention_cursors``.
EVENTS_CURSOR = "order_events"


def run_retention(
    engine: Engine,
    policy: RetentionPolicy,
    consumers: Sequence[str],
    *,
    now: datetime | None = None,
) -> dict[str, int]:
    """One run: remove what is past its retention, within the run's budget. ``consumers``
    are the deployment's event consumers. Returns the rows removed per table."""
    now = now or datetime.now(UTC)
    removed: dict[str, int] = {}

    def keyed(
        table: str, child: str | None, statement: Callable[[Connection, int], tuple[int, int]]
    ) -> None:
        for _ in range(policy.batches):
            with engine.begin() as conn:
                rows, children = statement(conn, policy.rows)
            _count(removed, table, rows)
            if child:
                _count(removed, child, children)
            if rows < policy.rows:
                break

    def by(period: timedelta, query: TextClause) -> Callable[[Connection, int], tuple[int, int]]:
        cutoff = now - period

        def run(conn: Connection, n: int) -> tuple[int, int]:
            rows, children = conn.execute(query, {"cutoff": cutoff, "n": n}).one()
            return int(rows), int(children)

        return run

    if policy.sagas:
        keyed("sagas", "saga_steps", by(policy.sagas, _SAGAS))
    if policy.idempotency_keys:
        keyed("idempotency_keys", None, by(policy.idempotency_keys, _IDEMPOTENCY_KEYS))
    if policy.events:
        _remove_events(engine, policy, policy.events, consumers, now, removed)
    if policy.dead_letters:
        keyed("dead_letters", None, by(policy.dead_letters, _DEAD_LETTERS))
    if policy.batch_runs:
        keyed("batch_runs", "batch_chunks", by(policy.batch_runs, _BATCH_RUNS))
    if any(removed.values()):
        logger.info("retention removed %s", ", ".join(f"{n} {t}" for t, n in removed.items()))
    return removed


def _remove_events(
    engine: Engine,
    policy: RetentionPolicy,
    period: timedelta,
    consumers: Sequence[str],
    now: datetime,
    removed: dict[str, int],
) -> None:
    """The events every consumer has applied, a span of the feed per statement."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(consumer_checkpoints.c.consumer, consumer_checkpoints.c.last_id)
        ).all()
    checkpoints: dict[str, int] = {name: last_id for name, last_id in rows}
    everyone = sorted(set(consumers) | set(checkpoints))
    if not everyone or any(name not in checkpoints for name in everyone):
        return  # a consumer that has read nothing yet needs every event
    ceiling = min(checkpoints.values())
    cutoff = now - period
    with engine.connect() as conn:
        after = conn.execute(
            select(retention_cursors.c.last_id).where(retention_cursors.c.name == EVENTS_CURSOR)
        ).scalar()
    if after is None or after >= ceiling:
        after = 0  # a checkpoint went back (a new consumer): from the lowest id again
    for _ in range(policy.batches):
        with engine.begin() as conn:
            gone, spanned, last_id, last_at = conn.execute(
                _EVENTS,
                {
                    "after": after,
                    "ceiling": ceiling,
                    "n": policy.rows,
                    "cutoff": cutoff,
                    "consumers": everyone,
                },
            ).one()
            # Past the ceiling, or among events too recent to go: the next span is
            # the lowest again. Else the next run goes on after this span, so events
            # kept at the head of the feed (an order not final) cannot stall the scan.
            finished = spanned < policy.rows or last_at >= cutoff
            after = 0 if finished else int(last_id)
            _save_cursor(conn, after, now)
        _count(removed, "order_events", int(gone))
        if finished:
            break


def _save_cursor(conn: Connection, after: int, now: datetime) -> None:
    row = {"name": EVENTS_CURSOR, "last_id": after, "updated_at": now}
    conn.execute(
        insert(retention_cursors)
        .values(row)
        .on_conflict_do_update(index_elements=[retention_cursors.c.name], set_=row)
    )


def _count(removed: dict[str, int], table: str, rows: int) -> None:
    removed[table] = removed.get(table, 0) + rows
    if rows:
        REMOVED.labels(table).inc(rows)
