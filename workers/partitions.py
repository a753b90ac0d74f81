"""The months of ``order_events``: made ahead, split out of DEFAULT, dropped when done.

``order_events`` is partitioned by RANGE on ``placed_at`` (the order's ``created_at``),
one partition a month in the schema ``partitions`` (``order_events_YYYY_MM``), and a
DEFAULT partition that takes an event of any month without one, so no append is ever
refused for want of a partition. Making and dropping partitions is DDL, which the
system's role may not do: the schema's owner runs this command (as for the
migrations), monthly or at least once a year:

- ``python -m workers.partitions list``: the months, and the rows in DEFAULT;
- ``python -m workers.partitions extend [--ahead 12]``: the months from the current one
  to ``ahead`` months on, and a month for each one with events in DEFAULT (those rows
  move into it);
- ``python -m workers.partitions drop [--dry-run]``: each month all of whose events are
  past ``RETAIN_EVENTS_DAYS``, of a final order, at or below every consumer's checkpoint
  and applied by every consumer goes whole; for each other past month it says why not.

Each change is one short transaction that waits at most ``LOCK_TIMEOUT`` for its locks
(appends wait on it meanwhile), and fails rather than queue behind a long transaction.
What is not dropped is still removed event by event by the retention job.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, select, text

from config.cli import ToolSettings
from config.database import make_engine
from orders.projections import event_consumers
from orders.tables import consumer_checkpoints

SCHEMA = "partitions"
DEFAULT = f"{SCHEMA}.order_events_default"
#: How long a change waits for its locks before it gives up (run it again later).
LOCK_TIMEOUT = "5s"
_MONTH = re.compile(r"order_events_(\d{4})_(\d{2})")
_COLUMNS = "id, order_id, seq, type, payload, occurred_at, placed_at"


@dataclass(frozen=True)
class Month:
    """A month's partition: events of orders placed from ``start`` to before ``end``."""

    start: datetime

    @property
    def end(self) -> datetime:
        """The first instant of the next month."""
        year, month = divmod(self.start.month, 12)
        return self.start.replace(year=self.start.year + year, month=month + 1)

    @property
    def table(self) -> str:
        """The partition's qualified name."""
        return f"{SCHEMA}.order_events_{self.start:%Y_%m}"

    def bounds(self) -> dict[str, datetime]:
        """The month's bounds as query parameters."""
        return {"start": self.start, "end": self.end}


def month_of(moment: datetime) -> Month:
    """The month ``moment`` is in (UTC)."""
    moment = moment.astimezone(UTC)
    return Month(datetime(moment.year, moment.month, 1, tzinfo=UTC))


def existing(conn: Connection) -> list[Month]:
    """The month partitions there are, oldest first."""
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'order_events'::regclass"
        )
    ).scalars()
    found = [_MONTH.fullmatch(name) for name in names]
    return sorted(
        (Month(datetime(int(m[1]), int(m[2]), 1, tzinfo=UTC)) for m in found if m),
        key=lambda month: month.start,
    )


def in_default(conn: Connection) -> list[tuple[Month, int]]:
    """The months with events in the DEFAULT partition, and how many."""
    rows = conn.execute(
        text(
            f"SELECT date_trunc('month', placed_at AT TIME ZONE 'UTC') AS m, count(*)"  # noqa: S608
            f" FROM {DEFAULT} GROUP BY m ORDER BY m"
        )
    ).all()
    return [(Month(start.replace(tzinfo=UTC)), int(n)) for start, n in rows]


def extend(engine: Engine, *, ahead: int, now: datetime | None = None) -> list[Month]:
    """Make the months from now's to ``ahead`` months on, and the months of the events
    in DEFAULT (moving them in). Returns the months made."""
    current = month_of(now or datetime.now(UTC))
    wanted = [current]
    for _ in range(ahead):
        wanted.append(Month(wanted[-1].end))
    with engine.connect() as conn:
        have = {month.start for month in existing(conn)}
        stray = {month.start: n for month, n in in_default(conn)}
    made = []
    for month in sorted({*wanted, *(Month(start) for start in stray)}, key=lambda m: m.start):
        if month.start in have:
            continue
        with engine.begin() as conn:
            conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            if month.start in stray:
                _split(conn, month)
            else:
                conn.execute(text(_create(month)))
        made.append(month)
    return made


def _create(month: Month) -> str:
    return (
        f"CREATE TABLE {month.table} PARTITION OF order_events FOR VALUES"
        f" FROM ('{month.start.isoformat()}') TO ('{month.end.isoformat()}')"
    )


def _split(conn: Connection, month: Month) -> None:
    """The month's events move from DEFAULT into a partition of their own: DEFAULT is
    detached meanwhile (a partition may not be made while DEFAULT holds rows of it)."""
    conn.execute(text(f"ALTER TABLE order_events DETACH PARTITION {DEFAULT}"))
    conn.execute(text(_create(month)))
    where = "placed_at >= :start AND placed_at < :end"
    conn.execute(
        text(
            f"INSERT INTO order_events ({_COLUMNS}) SELECT {_COLUMNS} FROM {DEFAULT} WHERE {where}"  # noqa: S608
        ),
        month.bounds(),
    )
    conn.execute(text(f"DELETE FROM {DEFAULT} WHERE {where}"), month.bounds())  # noqa: S608
    conn.execute(text(f"ALTER TABLE order_events ATTACH PARTITION {DEFAULT} DEFAULT"))


@dataclass(frozen=True)
class Verdict:
    """What ``drop`` did with a past month: dropped, or why not."""

    month: Month
    reasons: tuple[str, ...]

    @property
    def dropped(self) -> bool:
        """Every event of the month was done with."""
        return not self.reasons


def drop(
    engine: Engine,
    retain: timedelta,
    consumers: Sequence[str],
    *,
    now: datetime | None = None,
    dry_run: bool = False,
) -> list[Verdict]:
    """Drop each month that ended before the retention cutoff and all of whose events
    the retention job would remove; say why not for the others."""
    cutoff = (now or datetime.now(UTC)) - retain
    with engine.connect() as conn:
        months = [month for month in existing(conn) if month.end <= cutoff]
    verdicts = []
    for month in months:
        with engine.begin() as conn:
            conn.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            # No event is appended to the month while it is judged and dropped.
            conn.execute(text(f"LOCK TABLE {month.table} IN SHARE MODE"))
            reasons = _blockers(conn, month, cutoff, consumers)
            if not reasons and not dry_run:
                conn.execute(text(f"ALTER TABLE order_events DETACH PARTITION {month.table}"))
                conn.execute(text(f"DROP TABLE {month.table}"))
        verdicts.append(Verdict(month, tuple(reasons)))
    return verdicts


def _blockers(
    conn: Connection, month: Month, cutoff: datetime, consumers: Sequence[str]
) -> list[str]:
    """Why the month's events cannot all go (none: they can)."""
    checkpoints = dict(
        conn.execute(select(consumer_checkpoints.c.consumer, consumer_checkpoints.c.last_id)).all()
    )
    table = month.table  # a name of our own: formatted into the queries below
    counts: dict[str, tuple[str, dict[str, object]]] = {
        "happened within the retention period": (
            f"SELECT count(*) FROM {table} WHERE occurred_at >= :cutoff",  # noqa: S608
            {"cutoff": cutoff},
        ),
        "are of orders not final": (
            f"SELECT count(*) FROM {table} e JOIN orders o ON o.id = e.order_id"  # noqa: S608
            " WHERE o.status NOT IN ('CONFIRMED', 'CANCELLED', 'REFUNDED')",
            {},
        ),
    }
    for name in sorted(set(consumers) | set(checkpoints)):
        if name not in checkpoints:
            counts[f"wait for {name}, which has no checkpoint"] = (
                f"SELECT count(*) FROM {table}",  # noqa: S608
                {},
            )
            continue
        counts[f"are past {name}'s checkpoint"] = (
            f"SELECT count(*) FROM {table} WHERE id > :last_id",  # noqa: S608
            {"last_id": checkpoints[name]},
        )
        counts[f"are not applied by {name}"] = (
            f"SELECT count(*) FROM {table} e WHERE NOT EXISTS"  # noqa: S608
            " (SELECT 1 FROM consumer_positions p WHERE p.consumer = :name"
            " AND p.order_id = e.order_id AND p.last_seq >= e.seq)",
            {"name": name},
        )
    reasons = []
    for why, (query, params) in counts.items():
        n = int(conn.execute(text(query), params).scalar_one())
        if n:
            reasons.append(f"{n} events {why}")
    return reasons


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (as the schema's owner)."""
    parser = argparse.ArgumentParser(prog="python -m workers.partitions", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the months, and the events in DEFAULT")
    more = commands.add_parser("extend", help="make the months ahead; split DEFAULT")
    more.add_argument("--ahead", type=int, default=12, help="months past the current one")
    gone = commands.add_parser("drop", help="drop the months whose events are all done with")
    gone.add_argument("--dry-run", action="store_true", help="say what would go; drop nothing")
    args = parser.parse_args(argv)

    tool = ToolSettings.checked(broker=False, owner=True)
    if tool is None:
        return 1
    engine = make_engine(tool.settings, application_name="orders-partitions")
    try:
        if args.command == "list":
            with engine.connect() as conn:
                for month in existing(conn):
                    print(f"{month.table}\t{month.start:%Y-%m}")
                for month, n in in_default(conn):
                    print(f"{DEFAULT}\t{month.start:%Y-%m}\t{n} events")
        elif args.command == "extend":
            for month in extend(engine, ahead=max(args.ahead, 0)):
                print(f"made {month.table}")
        else:
            days = tool.settings.retain_events_days
            if days <= 0:
                print("RETAIN_EVENTS_DAYS is 0: events are kept for ever", file=sys.stderr)
                return 1
            names = [consumer.name for consumer in event_consumers(None)]
            for verdict in drop(engine, timedelta(days=days), names, dry_run=args.dry_run):
                if verdict.dropped:
                    print(f"{'would drop' if args.dry_run else 'dropped'} {verdict.month.table}")
                else:
                    print(f"kept {verdict.month.table}: {'; '.join(verdict.reasons)}")
    except Exception as exc:  # a lock not had in time, a server lost: say so plainly
        return tool.report(exc)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
