"""The batch credit check: every customer reviewed in chunks, in parallel, on the batch
lane, with a run that records its progress and finishes even when chunks fail.

    python -m workers.batch start             start a run now (on demand)
    python -m workers.batch status RUN_ID     a run's progress
    python -m workers.batch list              the latest runs

Beat starts a run per schedule tick; the run's window key (the tick) is unique per job,
so two beat processes firing the same tick make one run. A chunk that fails retries,
then becomes a dead letter and counts as failed; replaying it later runs it again and
moves its customers from failed to processed.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import Connection, Engine, case, literal, select, update
from sqlalchemy.dialects.postgresql import insert

from config import names
from config.failpoints import failpoint
from config.settings import Settings
from orders.credit_review import review_customers
from orders.tables import customers
from workers.tables import batch_chunks, batch_runs

JOB = "credit_check"
_r, _k = batch_runs.c, batch_chunks.c


@dataclass(frozen=True)
class RunStatus:
    """A run's progress."""

    id: str
    job: str
    window_key: str
    state: str
    total: int
    processed: int
    failed: int
    flagged: int
    chunks: int
    chunks_done: int
    chunks_failed: int
    started_at: str
    finished_at: str | None

    @property
    def progress(self) -> float:
        """Percent of customers reviewed or given up on."""
        return (
            100.0 if not self.total else round(100 * (self.processed + self.failed) / self.total, 1)
        )

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready primitives."""
        return {**asdict(self), "progress": self.progress}


def start_run(engine: Engine, app: Celery, settings: Settings, *, window: str) -> UUID | None:
    """Start the run of ``window``, or nothing if it was started already (by another
    beat). The run commits first (PUBLISHING), then its chunks are published, then it
    is RUNNING: a chunk never arrives before its run. A start that fails or dies while
    publishing is retried (or delivered again) and publishes every chunk again; a chunk
    delivered twice counts once."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        ids = list(conn.execute(select(customers.c.id).order_by(customers.c.id)).scalars())
        size = settings.credit_check_chunk_size
        chunks = [ids[n : n + size] for n in range(0, len(ids), size)]
        run_id: UUID | None = conn.execute(
            insert(batch_runs)
            .values(
                id=uuid.uuid4(),
                job=JOB,
                window_key=window,
                state="PUBLISHING" if chunks else "FINISHED",
                total=len(ids),
                chunks=len(chunks),
                started_at=now,
                finished_at=None if chunks else now,
            )
            .on_conflict_do_nothing()
            .returning(_r.id)
        ).scalar()
        if run_id is None:
            earlier = conn.execute(
                select(_r.id, _r.state, _r.chunks).where(_r.job == JOB, _r.window_key == window)
            ).one()
            if earlier.state != "PUBLISHING":
                return None
            run_id, chunks = earlier.id, chunks[: earlier.chunks]
    with app.producer_or_acquire() as producer:
        for number, chunk in enumerate(chunks):
            app.send_task(
                names.CREDIT_CHECK_CHUNK,
                args=(str(run_id), number, chunk),
                task_id=f"{run_id}.chunk-{number}",
                producer=producer,
            )
    with engine.begin() as conn:
        conn.execute(
            update(batch_runs)
            .where(_r.id == run_id, _r.state == "PUBLISHING")
            .values(state="RUNNING")
        )
    return run_id


def run_chunk(engine: Engine, run_id: UUID, number: int, customer_ids: list[str]) -> int:
    """Review one chunk's customers and count it in its run, once; return how many
    were flagged (0 for a chunk already done)."""
    failpoint("credit_check.chunk", key=number)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        earlier = _claim(conn, run_id, number, len(customer_ids), "DONE", now)
        if earlier == "DONE":
            return 0
        reviews = review_customers(conn, customer_ids, run_id, now)
        flagged = sum(1 for review in reviews if review.flagged)
        size = len(customer_ids)
        replayed = earlier == "FAILED"  # a dead-lettered chunk run again
        conn.execute(
            update(batch_runs)
            .where(_r.id == run_id)
            .values(
                processed=_r.processed + size,
                flagged=_r.flagged + flagged,
                chunks_done=_r.chunks_done + 1,
                failed=_r.failed - (size if replayed else 0),
                chunks_failed=_r.chunks_failed - (1 if replayed else 0),
            )
        )
        _finish_if_complete(conn, run_id, now)
    return flagged


def fail_chunk(engine: Engine, run_id: UUID, number: int, size: int) -> None:
    """Count a chunk that gave up (it is a dead letter now), so the run still finishes."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        if _claim(conn, run_id, number, size, "FAILED", now) is not None:
            return
        conn.execute(
            update(batch_runs)
            .where(_r.id == run_id)
            .values(failed=_r.failed + size, chunks_failed=_r.chunks_failed + 1)
        )
        _finish_if_complete(conn, run_id, now)


def _claim(
    conn: Connection, run_id: UUID, number: int, size: int, state: str, now: datetime
) -> str | None:
    """Record the chunk's end; None if first, else the state it already had (a DONE
    chunk stays done; a FAILED one run again becomes DONE)."""
    written = conn.execute(
        insert(batch_chunks)
        .values(run_id=run_id, chunk=number, size=size, state=state, finished_at=now)
        .on_conflict_do_nothing()
        .returning(literal(1))
    ).first()
    if written is not None:
        return None
    earlier: str = conn.execute(
        select(_k.state).where(_k.run_id == run_id, _k.chunk == number).with_for_update()
    ).scalar_one()
    if earlier == "FAILED" and state == "DONE":
        conn.execute(
            update(batch_chunks)
            .where(_k.run_id == run_id, _k.chunk == number)
            .values(state="DONE", finished_at=now)
        )
    return earlier


def _finish_if_complete(conn: Connection, run_id: UUID, now: datetime) -> None:
    conn.execute(
        update(batch_runs)
        .where(_r.id == run_id)
        .where(_r.chunks_done + _r.chunks_failed == _r.chunks)
        .values(
            state="FINISHED",
            finished_at=case((_r.finished_at.is_(None), now), else_=_r.finished_at),
        )
    )


def run_status(engine: Engine, run_id: UUID) -> RunStatus | None:
    """A run's progress, or None if there is no such run."""
    with engine.connect() as conn:
        row = conn.execute(select(batch_runs).where(_r.id == run_id)).first()
    return _status(row) if row else None


def latest_runs(engine: Engine, limit: int = 20) -> list[RunStatus]:
    """The most recent runs first."""
    with engine.connect() as conn:
        rows = conn.execute(select(batch_runs).order_by(_r.started_at.desc()).limit(limit))
        return [_status(row) for row in rows]


def _status(row: Any) -> RunStatus:
    return RunStatus(
        str(row.id),
        row.job,
        row.window_key,
        row.state,
        row.total,
        row.processed,
        row.failed,
        row.flagged,
        row.chunks,
        row.chunks_done,
        row.chunks_failed,
        row.started_at.isoformat(),
        row.finished_at.isoformat() if row.finished_at else None,
    )


def on_demand_window() -> str:
    """A window of its own for a run started by hand."""
    return f"manual-{datetime.now(UTC).isoformat()}-{uuid.uuid4().hex[:8]}"


def main(argv: list[str] | None = None) -> int:
    """The operators' command line."""
    from config.settings import load_settings
    from orders.db import make_engine
    from workers.celery_app import create_celery

    parser = argparse.ArgumentParser(prog="python -m workers.batch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start", help="start a credit check now")
    commands.add_parser("status", help="a run's progress").add_argument("run_id", type=UUID)
    commands.add_parser("list", help="the latest runs")
    args = parser.parse_args(argv)
    settings = load_settings()
    engine = make_engine(settings, application_name="orders-batch")
    if args.command == "start":
        app = create_celery(settings, publisher=True)
        run_id = start_run(engine, app, settings, window=on_demand_window())
        print(json.dumps({"run_id": str(run_id)}))
    elif args.command == "status":
        status = run_status(engine, args.run_id)
        if status is None:
            print(f"error: no run {args.run_id}", file=sys.stderr)
            return 1
        print(json.dumps(status.to_dict(), indent=2))
    else:
        for status in latest_runs(engine):
            print(json.dumps(status.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
