"""The batch credit check: every customer reviewed in chunks, in parallel, on the batch
lane, with a run that records its progress and finishes even when chunks fail.

    python -m workers.batch start             start a run now (on demand)
    python -m workers.batch start --full      a run that sums every customer's orders anew
    python -m workers.batch status RUN_ID     a run's progress
    python -m workers.batch list              the latest runs
    python -m workers.batch findings [--all]  the customers the latest reviews flagged
                                              (--all: every customer's latest review)

Beat starts a run per schedule tick; the run's window key (the tick) is unique per job,
so two beat processes firing the same tick make one run. A chunk that fails retries,
then becomes a dead letter and counts as failed; replaying it later runs it again and
moves its customers from failed to processed.

The batch sweep (beat, on the default lane) takes up runs that stopped moving, however
they were started: a run left PUBLISHING (its publisher died or lost the broker) or
RUNNING with chunk messages lost has its chunks without an outcome published again, a
few times; then it is FAILED with a reason, its missing chunks counted failed and kept
as dead letters. States: PUBLISHING -> RUNNING -> FINISHED, or FAILED from either.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import ColumnElement, Connection, Engine, and_, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert

from config import names
from config.cli import ToolSettings
from config.failpoints import failpoint
from config.settings import Settings
from orders.credit_review import clear_checkpoints, review_customers
from orders.tables import credit_reviews, customers
from workers import dlq
from workers.tables import batch_chunks, batch_runs

JOB = "credit_check"
#: The states of a run not over yet.
ACTIVE = ("PUBLISHING", "RUNNING")
logger = logging.getLogger(__name__)
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
    #: How often the batch sweep resumed the run.
    resumes: int = 0
    #: Why the sweep gave up on the run (state FAILED).
    reason: str | None = None

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
    publishing is retried (or delivered again), or the batch sweep takes the run up: the
    chunks without an outcome are published again; a chunk delivered twice counts once."""
    now = datetime.now(UTC)
    size = settings.credit_check_chunk_size
    with engine.begin() as conn:
        chunks = _cut(conn, size)
        run_id: UUID | None = conn.execute(
            insert(batch_runs)
            .values(
                id=uuid.uuid4(),
                job=JOB,
                window_key=window,
                state="PUBLISHING" if chunks else "FINISHED",
                total=sum(map(len, chunks)),
                chunks=len(chunks),
                chunk_size=size,
                chunk_starts=[chunk[0] for chunk in chunks],
                started_at=now,
                finished_at=None if chunks else now,
            )
            .on_conflict_do_nothing()
            .returning(_r.id)
        ).scalar()
        if run_id is None:
            earlier = conn.execute(
                select(batch_runs).where(_r.job == JOB, _r.window_key == window)
            ).one()
            if earlier.state != "PUBLISHING":
                return None
            run_id, pending = earlier.id, _pending(conn, earlier, size)
        else:
            pending = dict(enumerate(chunks))
    _publish(engine, app, run_id, pending)
    return run_id


def _cut(conn: Connection, size: int) -> list[list[str]]:
    """Every customer, in id order, cut into chunks of ``size``."""
    ids = list(conn.execute(select(customers.c.id).order_by(customers.c.id)).scalars())
    return [ids[n : n + size] for n in range(0, len(ids), size)]


def _pending(conn: Connection, run: Any, size: int) -> dict[int, list[str]]:
    """The run's chunks without an outcome, by number, each with the customers between
    its first customer and the next chunk's, as the run was cut: a customer added since
    falls in the chunk whose range holds it, one removed is missing from its chunk, and
    no customer is in two chunks."""
    done = set(conn.execute(select(_k.chunk).where(_k.run_id == run.id)).scalars())
    missing = [n for n in range(run.chunks) if n not in done]
    starts: list[str] | None = run.chunk_starts
    if not starts:  # a run cut before the starts were kept
        chunks = _cut(conn, run.chunk_size or size)
        return {n: chunks[n] if n < len(chunks) else [] for n in missing}
    pending: dict[int, list[str]] = {}
    for n in missing:
        query = select(customers.c.id).where(customers.c.id >= starts[n])
        if n + 1 < len(starts):
            query = query.where(customers.c.id < starts[n + 1])
        pending[n] = list(conn.execute(query.order_by(customers.c.id)).scalars())
    return pending


def _publish(engine: Engine, app: Celery, run_id: UUID, chunks: dict[int, list[str]]) -> None:
    """Publish these chunks of the run, then mark it RUNNING (if it was publishing)."""
    with app.producer_or_acquire() as producer:
        for number, ids in chunks.items():
            failpoint("batch.publish", key=number)
            app.send_task(
                names.CREDIT_CHECK_CHUNK,
                args=(str(run_id), number, ids),
                task_id=f"{run_id}.chunk-{number}",
                producer=producer,
            )
    with engine.begin() as conn:
        conn.execute(
            update(batch_runs)
            .where(_r.id == run_id, _r.state == "PUBLISHING")
            .values(state="RUNNING")
        )


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
    """FINISHED once every chunk has an outcome (a FAILED run stays failed)."""
    conn.execute(
        update(batch_runs)
        .where(_r.id == run_id, _r.state.in_(ACTIVE))
        .where(_r.chunks_done + _r.chunks_failed == _r.chunks)
        .values(state="FINISHED", finished_at=now)
    )


@dataclass
class SweepReport:
    """What one batch sweep did."""

    resumed: int = 0
    failed: int = 0


#: When a run last moved: its start, its last resume or its last chunk outcome.
_last_moved = func.greatest(
    _r.started_at,
    _r.resumed_at,
    select(func.max(_k.finished_at)).where(_k.run_id == _r.id).scalar_subquery(),
)


def _stalled(settings: Settings, now: datetime) -> ColumnElement[bool]:
    publishing_since = now - timedelta(seconds=settings.batch_publish_grace_seconds)
    running_since = now - timedelta(seconds=settings.batch_stall_seconds)
    return or_(
        and_(_r.state == "PUBLISHING", _last_moved < publishing_since),
        and_(_r.state == "RUNNING", _last_moved < running_since),
    )


def sweep_runs(
    engine: Engine,
    app: Celery,
    settings: Settings,
    *,
    now: datetime | None = None,
    lane_ready: Callable[[], bool] = lambda: True,
) -> SweepReport:
    """Take up the runs that stopped moving, however they were started: one still
    PUBLISHING ``batch_publish_grace_seconds`` after it last moved (its publisher died
    or lost the broker), or RUNNING with no chunk outcome for ``batch_stall_seconds``
    (chunk messages lost). Each is resumed, its chunks without an outcome published
    again, up to ``batch_max_resumes`` times; then it is FAILED with a reason, its
    missing chunks counted failed and kept as dead letters (a replay runs them). One
    transaction per run, its row locked: two sweeps never take up one run together.

    While the batch lane is not ready (``lane_ready``: no worker consumes it, or it has
    a backlog), nothing is resumed or failed: the run is late, not lost."""
    now = now or datetime.now(UTC)
    report = SweepReport()
    with engine.connect() as conn:
        stalled = list(conn.execute(select(_r.id).where(_stalled(settings, now))).scalars())
    if stalled and not lane_ready():
        logger.info("%d batch run(s) stalled while the batch lane is not ready", len(stalled))
        return report
    for run_id in stalled:
        with engine.begin() as conn:
            run = conn.execute(
                select(batch_runs)
                .where(_r.id == run_id, _stalled(settings, now))
                .with_for_update(skip_locked=True)
            ).first()
            if run is None:
                continue  # it moved meanwhile, or another sweep has it
            pending = _pending(conn, run, settings.credit_check_chunk_size)
            giving_up = run.resumes >= settings.batch_max_resumes
            if giving_up:
                lost, reason = _give_up(conn, run, pending, now)
                _keep_as_dead_letters(conn, settings, run_id, lost, reason)
            else:
                conn.execute(
                    update(batch_runs)
                    .where(_r.id == run_id)
                    .values(resumes=_r.resumes + 1, resumed_at=now)
                )
        if giving_up:
            logger.error("batch run %s failed: %s", run_id, reason)
            report.failed += 1
        else:
            logger.warning(
                "batch run %s (%s) stalled: %d chunk(s) published again (resume %d of %d)",
                run_id,
                run.state,
                len(pending),
                run.resumes + 1,
                settings.batch_max_resumes,
            )
            _publish(engine, app, run_id, pending)
            report.resumed += 1
    return report


def _give_up(
    conn: Connection, run: Any, pending: dict[int, list[str]], now: datetime
) -> tuple[dict[int, list[str]], str]:
    """Fail the run: its chunks without an outcome count as failed (a late or replayed
    chunk still moves its customers to processed). Return those chunks and the reason."""
    numbers = ", ".join(map(str, list(pending)[:20])) + (", ..." if len(pending) > 20 else "")
    reason = (
        f"{run.state}: no outcome for chunk(s) {numbers} of {run.chunks}"
        f" after {run.resumes} resume(s)"
    )
    lost: dict[int, list[str]] = {}
    if pending:
        written = conn.execute(
            insert(batch_chunks)
            .values(
                [
                    {"run_id": run.id, "chunk": n, "size": len(ids), "state": "FAILED"}
                    | {"finished_at": now}
                    for n, ids in pending.items()
                ]
            )
            .on_conflict_do_nothing()
            .returning(_k.chunk)
        ).scalars()
        lost = {number: pending[number] for number in written}
    conn.execute(
        update(batch_runs)
        .where(_r.id == run.id)
        .values(
            state="FAILED",
            reason=reason,
            finished_at=now,
            failed=_r.failed + sum(map(len, lost.values())),
            chunks_failed=_r.chunks_failed + len(lost),
        )
    )
    return lost, reason


def _keep_as_dead_letters(
    conn: Connection, settings: Settings, run_id: UUID, lost: dict[int, list[str]], reason: str
) -> None:
    """The chunks a failed run gave up on, as dead letters an operator can replay (in
    the transaction that fails the run)."""
    for number, ids in lost.items():
        dlq.record_in(
            conn,
            task_id=f"{run_id}.chunk-{number}",
            task_name=names.CREDIT_CHECK_CHUNK,
            kind=dlq.EXHAUSTED,
            error=f"batch run failed: {reason}",
            args=[str(run_id), number, ids],
            queue=settings.batch_queue,
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
        row.resumes,
        row.reason,
    )


#: Most reviews one page of findings holds.
MAX_FINDINGS = 1000


def credit_findings(
    engine: Engine, *, flagged_only: bool = True, limit: int = 100, after: str | None = None
) -> list[dict[str, Any]]:
    """Customers' latest credit reviews, by customer id (those after ``after``), at most
    ``limit``: only the flagged ones (over their limit, or figures that disagree with
    their orders: ``findings`` says how) unless ``flagged_only`` is False."""
    review = credit_reviews.c
    query = select(credit_reviews).order_by(review.customer_id).limit(limit)
    if flagged_only:  # the partial index of flagged reviews
        query = query.where(or_(review.over_limit, review.inconsistent))
    if after is not None:
        query = query.where(review.customer_id > after)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        {
            "customer_id": row.customer_id,
            "run_id": str(row.run_id),
            "reviewed_at": row.reviewed_at.isoformat(),
            "flagged": row.over_limit or row.inconsistent,
            "over_limit": row.over_limit,
            "inconsistent": row.inconsistent,
            "findings": list(row.findings),
            "credit_limit": f"{row.credit_limit:.2f}",
            "credit_used": f"{row.credit_used:.2f}",
            "credit_reserved": f"{row.credit_reserved:.2f}",
            "available": f"{row.available:.2f}",
        }
        for row in rows
    ]


def on_demand_window() -> str:
    """A window of its own for a run started by hand."""
    return f"manual-{datetime.now(UTC).isoformat()}-{uuid.uuid4().hex[:8]}"


def main(argv: list[str] | None = None) -> int:
    """The operators' command line (settings from the environment, completed from the
    ``.run/env`` of ``make run``; what is missing is said plainly, exit status 1)."""
    from config.database import make_engine
    from workers.celery_app import create_celery

    parser = argparse.ArgumentParser(prog="python -m workers.batch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a credit check now")
    start.add_argument(
        "--full",
        action="store_true",
        help="forget the reviews' checkpoints first: every customer's orders are summed"
        " again, not only those changed since their last review",
    )
    commands.add_parser("status", help="a run's progress").add_argument("run_id", type=UUID)
    commands.add_parser("list", help="the latest runs")
    findings = commands.add_parser(
        "findings", help="the customers the credit check flagged, a JSON line each"
    )
    findings.add_argument(
        "--all", action="store_true", help="every customer's latest review, flagged or not"
    )
    findings.add_argument(
        "--limit", type=_page_size, default=100, help=f"reviews at most (1 to {MAX_FINDINGS})"
    )
    findings.add_argument("--after", metavar="CUSTOMER_ID", help="the customers after this one")
    args = parser.parse_args(argv)
    tool = ToolSettings.checked(broker=args.command == "start")
    if tool is None:
        return 1
    settings = tool.settings
    engine = make_engine(settings, application_name="orders-batch")
    try:
        if args.command == "start":
            app = create_celery(settings, publisher=True)
            return _start_command(engine, app, tool, full=args.full)
        if args.command == "status":
            status = run_status(engine, args.run_id)
            if status is None:
                print(f"error: no run {args.run_id}", file=sys.stderr)
                return 1
            print(json.dumps(status.to_dict(), indent=2))
        elif args.command == "findings":
            _findings_command(engine, args.all, args.limit, args.after)
        else:
            for status in latest_runs(engine):
                print(json.dumps(status.to_dict()))
    except Exception as exc:
        return tool.report(exc)
    finally:
        engine.dispose()
    return 0


def _page_size(text: str) -> int:
    """A --limit: a whole number from 1 to MAX_FINDINGS."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_FINDINGS:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to {MAX_FINDINGS}")
    return int(text)


def _findings_command(engine: Engine, every: bool, limit: int, after: str | None) -> None:
    """Print a page of reviews, and on standard error how to read the next one."""
    page = credit_findings(engine, flagged_only=not every, limit=limit + 1, after=after)
    for review in page[:limit]:
        print(json.dumps(review))
    if len(page) > limit:
        more = page[limit - 1]["customer_id"]
        print(f"more: add --after {more}", file=sys.stderr)


def _start_command(engine: Engine, app: Celery, tool: ToolSettings, *, full: bool) -> int:
    """Start a run now (``full``: after forgetting the checkpoints); a broker lost while
    publishing leaves it to the batch sweep."""
    started: dict[str, Any] = {}
    if full:
        with engine.begin() as conn:
            started["checkpoints_cleared"] = clear_checkpoints(conn)
    window = on_demand_window()
    try:
        run_id = start_run(engine, app, tool.settings, window=window)
    except Exception as exc:
        explained = tool.explain(exc)
        if explained is None:
            raise
        with engine.connect() as conn:
            run_id = conn.execute(select(_r.id).where(_r.window_key == window)).scalar()
        print(f"error: {explained}", file=sys.stderr)
        if run_id is not None:
            wait = tool.settings.batch_publish_grace_seconds
            print(
                f"  run {run_id} is recorded but not all its chunks were published: the"
                f" batch sweep (beat) publishes them once the broker answers (after"
                f" {wait:g} s); `python -m workers.batch status {run_id}` shows it",
                file=sys.stderr,
            )
        return 1
    print(json.dumps({"run_id": str(run_id), **started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
