"""The dead-letter queue, in PostgreSQL: messages that could not be processed, kept with
their arguments, error and attempts for an operator to list, show, replay or purge.

    python -m workers.dlq list [--task NAME] [--error TEXT] [--older-than 1h] [--state open]
    python -m workers.dlq show ID
    python -m workers.dlq replay ID [ID...]      (or: replay --all with the list filters)
    python -m workers.dlq purge ID [ID...]

Replaying sends the task again with the same arguments to the same lane; replaying a
step of a saga dispatches the saga's running stage again, on the definition of the
saga's name and version, which resumes it (its steps are idempotent) or lets it be
compensated. A step whose saga version the worker did not have (``failed``, with the
error ``UnknownSagaVersion: saga 'trip' version 2 is not deployed on this worker ...``)
recorded no outcome: once a worker that has the version runs, replaying it runs it.

Each letter has a kind. A task that gave up (workers.base) leaves one of:

    exhausted             a transient error outlasted the task's retries
    failed                an error that is not transient
    poison                the message crashed its worker more than MAX_REDELIVERIES times
    compensation_failed   a saga's compensation failed COMPENSATION_MAX_ATTEMPTS times and
                          is no longer retried; replaying it hands the saga back to the
                          sweeper, which tries the compensation again at once
    webhook_dead          a webhook delivery used up its WEBHOOK_MAX_ATTEMPTS attempts;
                          replaying it hands the delivery back to the webhooks lane, due
                          now, its attempts counted from zero (the letter is resolved
                          when it is delivered, however it was replayed)

A message no task ever ran (workers.consumer; workers.compat for list items kombu
cannot read) leaves one of these, with the item's bytes as ``raw``:

    undecodable           bytes that cannot be read: a list item that is not JSON (or not
                          UTF-8), or a body its encoding or content type cannot decode
    not_an_envelope       JSON, but not the envelope kombu writes (an object with headers
                          and properties holding a delivery tag and delivery info)
    refused_content_type  a body in a serializer the workers refuse (pickle, YAML,
                          msgpack: they accept JSON only)
    too_large             a body over MAX_MESSAGE_BYTES (not decoded)
    malformed_body        a body that is not [args, kwargs, embed]: a list, an object,
                          an object or null
    malformed_headers     headers no task message has: no task name or id, a time limit,
                          retry count, ETA or expiry of the wrong form
    unknown_task          a task no worker registers
    bad_arguments         arguments the task cannot take: too many or too few, unknown
                          names, the wrong types, a saga or run id that is not a UUID
    unprocessable         anything else Celery could not take in (the error says what)

Letters of those kinds, but for unknown_task (the task may have been deployed since),
are not replayed: they hold no task that could run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.dialects.postgresql import insert

from orders import webhook_deliveries
from orders.tables import webhook_deliveries as webhook_table
from sagas.canvas import dispatch_saga
from sagas.definition import SagaDefinition, UnknownSagaVersion
from sagas.operations import describe_step
from sagas.registry import SagaRegistry
from sagas.tables import sagas
from workers.tables import dead_letters

_d = dead_letters.c
#: Longest traceback or raw message kept.
KEEP_CHARS = 20_000

#: The kinds of letter (see the module's docstring).
EXHAUSTED = "exhausted"
FAILED = "failed"
POISON = "poison"
COMPENSATION_FAILED = "compensation_failed"
WEBHOOK_DEAD = "webhook_dead"
UNDECODABLE = "undecodable"
NOT_AN_ENVELOPE = "not_an_envelope"
REFUSED_CONTENT_TYPE = "refused_content_type"
TOO_LARGE = "too_large"
MALFORMED_BODY = "malformed_body"
MALFORMED_HEADERS = "malformed_headers"
UNKNOWN_TASK = "unknown_task"
BAD_ARGUMENTS = "bad_arguments"
UNPROCESSABLE = "unprocessable"
#: Kinds of letter that hold no task that could run: replaying them is refused.
NOT_REPLAYABLE = frozenset(
    {
        UNDECODABLE,
        NOT_AN_ENVELOPE,
        REFUSED_CONTENT_TYPE,
        TOO_LARGE,
        MALFORMED_BODY,
        MALFORMED_HEADERS,
        BAD_ARGUMENTS,
        UNPROCESSABLE,
    }
)


class DeadLetterError(Exception):
    """An operation on a dead letter that cannot be done (unknown, not open, no args)."""


class UnknownLetterError(DeadLetterError):
    """There is no dead letter with that id."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as operators see it."""

    id: int
    task_id: str
    task_name: str
    kind: str
    args: Any
    kwargs: Any
    queue: str | None
    error: str
    traceback: str | None
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    state: str
    replayed_task_id: str | None
    raw: str | None = None

    def summary(self) -> dict[str, Any]:
        """The letter without its traceback and raw body, as JSON-ready primitives."""
        data = asdict(self)
        data.pop("traceback")
        data.pop("raw")
        for key in ("first_failed_at", "last_failed_at"):
            data[key] = data[key].isoformat()
        return data

    def detail(self) -> dict[str, Any]:
        """Everything about the letter."""
        return {**self.summary(), "traceback": self.traceback, "raw": self.raw}


def record(engine: Engine, **letter: Any) -> None:
    """Keep a message that could not be processed (see ``record_in``), in a transaction
    of its own."""
    with engine.begin() as conn:
        record_in(conn, **letter)


def record_in(
    conn: Connection,
    *,
    task_id: str | None,
    task_name: str,
    kind: str,
    error: str,
    args: Any = None,
    kwargs: Any = None,
    queue: str | None = None,
    traceback: str | None = None,
    attempts: int = 1,
    raw: str | None = None,
) -> None:
    """Keep a message that could not be processed; a second failure of the same message
    (task id) updates its letter. Whatever the message held is stored: text PostgreSQL
    refuses (a NUL character, half a surrogate pair) is kept escaped."""
    now = datetime.now(UTC)
    values = {
        "task_id": _text(task_id or f"undelivered-{uuid.uuid4()}")[:255],
        "task_name": _text(task_name)[:255],
        "kind": kind,
        "args": _jsonable(args),
        "kwargs": _jsonable(kwargs),
        "raw": _text(raw)[:KEEP_CHARS] if raw else None,
        "queue": _text(queue)[:255] if queue else None,
        "error": _text(error)[:KEEP_CHARS],
        "traceback": _text(traceback)[-KEEP_CHARS:] if traceback else None,
        "attempts": attempts,
        "first_failed_at": now,
        "last_failed_at": now,
    }
    upsert = insert(dead_letters).values(values)
    conn.execute(
        upsert.on_conflict_do_update(
            index_elements=[_d.task_id],
            set_={
                "kind": upsert.excluded.kind,
                "error": upsert.excluded.error,
                "traceback": upsert.excluded.traceback,
                "attempts": func.greatest(_d.attempts + 1, upsert.excluded.attempts),
                "last_failed_at": upsert.excluded.last_failed_at,
                "state": "OPEN",
            },
        )
    )


def resolve_in(conn: Connection, task_id: str) -> None:
    """Mark the open letter of ``task_id`` (if any) REPLAYED: what it held was done."""
    conn.execute(
        update(dead_letters)
        .where(_d.task_id == task_id, _d.state == "OPEN")
        .values(state="REPLAYED", replayed_task_id=task_id, resolved_at=datetime.now(UTC))
    )


def _jsonable(value: Any) -> Any:
    return None if value is None else _storable(json.loads(json.dumps(value, default=str)))


def _storable(value: Any) -> Any:
    """JSON that PostgreSQL's jsonb takes: every string in it made storable."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, list):
        return [_storable(item) for item in value]
    if isinstance(value, dict):
        return {_text(key): _storable(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and infinities are not JSON
    return value


def _text(value: str) -> str:
    """``value`` as text PostgreSQL stores: a lone surrogate and NUL kept as escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _letter(row: Any) -> DeadLetter:
    return DeadLetter(
        row.id,
        row.task_id,
        row.task_name,
        row.kind,
        row.args,
        row.kwargs,
        row.queue,
        row.error,
        row.traceback,
        row.attempts,
        row.first_failed_at,
        row.last_failed_at,
        row.state,
        row.replayed_task_id,
        row.raw,
    )


@dataclass(frozen=True)
class Filter:
    """Which letters an operation applies to."""

    task: str | None = None
    #: A piece of the error text (case-insensitive).
    error: str | None = None
    #: Only letters whose last failure is at least this old.
    older_than: timedelta | None = None
    state: str = "OPEN"
    limit: int = 100


def list_letters(engine: Engine, which: Filter = Filter()) -> list[DeadLetter]:
    """The letters matching the filter, most recent failure first."""
    query = select(dead_letters).where(_d.state == which.state.upper())
    if which.task:
        query = query.where(_d.task_name == which.task)
    if which.error:
        query = query.where(_d.error.ilike(f"%{_escape_like(which.error)}%", escape="\\"))
    if which.older_than:
        query = query.where(_d.last_failed_at <= datetime.now(UTC) - which.older_than)
    query = query.order_by(_d.last_failed_at.desc()).limit(which.limit)
    with engine.connect() as conn:
        return [_letter(row) for row in conn.execute(query)]


def _escape_like(text: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", text)


def show(engine: Engine, letter_id: int) -> DeadLetter:
    """One letter; DeadLetterError if there is none with that id."""
    with engine.connect() as conn:
        row = conn.execute(select(dead_letters).where(_d.id == letter_id)).first()
    if row is None:
        raise UnknownLetterError(f"no dead letter {letter_id}")
    return _letter(row)


def count_open(engine: Engine) -> int:
    """How many letters wait for an operator."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(dead_letters).where(_d.state == "OPEN")
            ).scalar_one()
        )


def replay(
    engine: Engine,
    app: Celery,
    letter_ids: Sequence[int],
    definitions: SagaRegistry,
) -> dict[int, str]:
    """Run the letters' tasks again; return each letter's new task id. A saga step
    dispatches its saga's running stage again (when the saga is not over yet), on the
    definition of the saga's name and version in ``definitions`` (refused with
    UnknownSagaVersion's message if it has not that version); a compensation given up
    is handed back to the sweeper ("sweep:<saga id>"). Letters are marked
    REPLAYED. Every letter is checked first: one that cannot be replayed refuses the
    whole request (UnknownLetterError or DeadLetterError) and nothing is replayed."""
    step_tasks = {step.task: d for d in definitions.definitions() for step in d.steps}
    wanted = list(dict.fromkeys(letter_ids))
    with engine.connect() as conn:
        rows = {row.id: row for row in conn.execute(select(dead_letters).where(_d.id.in_(wanted)))}
        for letter_id in wanted:
            row = rows.get(letter_id)
            if row is None:
                raise UnknownLetterError(f"no dead letter {letter_id}")
            if row.state != "OPEN":
                raise DeadLetterError(f"dead letter {letter_id} is {row.state}, not OPEN")
            if row.kind in NOT_REPLAYABLE:
                raise DeadLetterError(
                    f"dead letter {letter_id} is {row.kind}: it holds no task that could run"
                    " (see its raw message; purge the letter)"
                )
            if not isinstance(row.args, list) or (row.task_name in step_tasks and not row.args):
                raise DeadLetterError(f"dead letter {letter_id} has no arguments to replay")
            if row.kind == WEBHOOK_DEAD:
                if _delivery_state(conn, row.args[0]) != "DEAD":
                    raise DeadLetterError(
                        f"the delivery of dead letter {letter_id} is not DEAD: nothing to"
                        " replay (purge the letter)"
                    )
            elif row.kind == COMPENSATION_FAILED:
                state = _saga_state(conn, row.args[1])
                if state != "COMPENSATION_FAILED":
                    raise DeadLetterError(
                        f"the saga of dead letter {letter_id} is {state}: its compensation is"
                        " not waiting for anyone (purge the letter)"
                    )
            elif row.task_name in step_tasks:
                state = _saga_state(conn, row.args[0])
                if state is None:
                    raise DeadLetterError(f"the saga of dead letter {letter_id} does not exist")
                if state in ("CONFIRMED", "CANCELLED"):
                    definition = step_tasks[row.task_name]
                    raise DeadLetterError(
                        decided_step_refusal(
                            conn, letter_id, definition, row.task_name, row.args[0]
                        )
                    )
    replayed: dict[int, str] = {}
    for letter_id in wanted:
        with engine.begin() as conn:
            row = conn.execute(
                select(dead_letters).where(_d.id == letter_id, _d.state == "OPEN").with_for_update()
            ).first()
            if row is None:  # replayed or purged meanwhile by someone else
                raise DeadLetterError(f"dead letter {letter_id} is no longer OPEN")
            if row.kind == WEBHOOK_DEAD:
                if not webhook_deliveries.rearm(conn, UUID(row.args[0])):
                    raise DeadLetterError(f"the delivery of dead letter {letter_id} is not DEAD")
                new_id = row.task_id
            elif row.kind == COMPENSATION_FAILED:
                new_id = _rearm_compensation(conn, row.args[1])
            elif row.task_name in step_tasks:
                new_id = _redispatch_saga(conn, app, definitions, row.args[0])
            else:
                new_id = str(uuid.uuid4())
                app.send_task(
                    row.task_name,
                    args=row.args,
                    kwargs=row.kwargs or {},
                    task_id=new_id,
                    **({"queue": row.queue} if row.queue else {}),
                )
            conn.execute(
                update(dead_letters)
                .where(_d.id == letter_id)
                .values(state="REPLAYED", replayed_task_id=new_id, resolved_at=datetime.now(UTC))
            )
        replayed[letter_id] = new_id
    return replayed


def _saga_state(conn: Any, saga_id: Any) -> str | None:
    try:
        saga = UUID(str(saga_id))
    except ValueError:
        return None
    state: str | None = conn.execute(select(sagas.c.state).where(sagas.c.id == saga)).scalar()
    return state


#: What to do instead of replaying a step of a saga decided meanwhile, by saga name.
_RETRY_HINT = {
    "order": "to retry the order, place it again",
    "refund": "to retry the refund, ask for it again (POST /orders/<id>/refund)",
}


def decided_step_refusal(
    conn: Connection, letter_id: int, definition: SagaDefinition, task: str, saga_id: Any
) -> str:
    """Why a step of a saga decided meanwhile is not replayed, and what to do: the saga,
    its state and reason, when it was decided, what the ledger says of the step."""
    saga = conn.execute(
        select(sagas.c.name, sagas.c.state, sagas.c.reason, sagas.c.finished_at).where(
            sagas.c.id == UUID(str(saga_id))
        )
    ).one()
    step = next(step.name for step in definition.steps if step.task == task)
    why = f" ({saga.reason})" if saga.reason else ""
    when = f" at {saga.finished_at.isoformat()}" if saga.finished_at else ""
    hint = _RETRY_HINT.get(saga.name, "to run it again, start a new saga")
    return (
        f"dead letter {letter_id} is not replayed: saga {saga_id} ({saga.name}) was"
        f" {saga.state}{why}{when}, and its {describe_step(conn, UUID(str(saga_id)), step)}."
        f" Nothing to resume: purge the letter with `python -m workers.dlq purge {letter_id}`;"
        f" {hint}"
    )


def _delivery_state(conn: Any, delivery_id: Any) -> str | None:
    try:
        delivery = UUID(str(delivery_id))
    except ValueError:
        return None
    state: str | None = conn.execute(
        select(webhook_table.c.state).where(webhook_table.c.id == delivery)
    ).scalar()
    return state


def _rearm_compensation(conn: Connection, saga_id: str) -> str:
    """Hand a saga whose compensation was given up back to the sweeper, now, with its
    tries counted from zero: it is retried (and backs off) as after a first failure."""
    conn.execute(
        update(sagas)
        .where(sagas.c.id == UUID(saga_id), sagas.c.state == "COMPENSATION_FAILED")
        .values(deadline_at=datetime.now(UTC), recovery_attempts=0)
    )
    return f"sweep:{saga_id}"


def _redispatch_saga(conn: Any, app: Celery, definitions: SagaRegistry, saga_id: str) -> str:
    """Dispatch the saga's running stage, on its own version."""
    saga = conn.execute(
        select(sagas.c.name, sagas.c.version, sagas.c.stage, sagas.c.payload).where(
            sagas.c.id == UUID(saga_id)
        )
    ).first()
    if saga is None:
        raise DeadLetterError(f"saga {saga_id} of this step does not exist")
    try:
        definition = definitions.definition(saga.name, saga.version)
    except UnknownSagaVersion as exc:
        raise DeadLetterError(str(exc).replace("on this worker", "here")) from exc
    dispatch_saga(app, definition, UUID(saga_id), saga.payload, stage=saga.stage)
    return f"saga:{saga_id}"


def purge(engine: Engine, letter_ids: Sequence[int]) -> int:
    """Mark letters PURGED (kept for the record, no longer open); return how many."""
    with engine.begin() as conn:
        done = conn.execute(
            update(dead_letters)
            .where(_d.id.in_(list(letter_ids)))
            .where(_d.state == "OPEN")
            .values(state="PURGED", resolved_at=datetime.now(UTC))
        )
    return done.rowcount


def parse_age(text: str) -> timedelta:
    """'90s', '15m', '2h', '3d' as a duration."""
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration like 15m or 2h: {text!r}")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
    return timedelta(**{unit: int(match[1])})


def main(argv: list[str] | None = None) -> int:
    """The operators' command line (settings from the environment, completed from the
    ``.run/env`` of ``make run``; what is missing is said plainly, exit status 1)."""
    from config.cli import ToolSettings
    from config.database import make_engine
    from workers.celery_app import create_celery
    from workers.runtime import saga_registry

    parser = argparse.ArgumentParser(prog="python -m workers.dlq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--task")
    listing.add_argument("--error")
    listing.add_argument("--older-than", type=parse_age)
    listing.add_argument(
        "--state",
        default="open",
        type=str.lower,
        choices=["open", "replayed", "purged"],
        help="either case (letters show it as OPEN, REPLAYED, PURGED)",
    )
    listing.add_argument("--limit", type=int, default=100)
    commands.add_parser("list", parents=[listing], help="list letters")
    commands.add_parser("show", help="one letter in full").add_argument("id", type=int)
    replay_cmd = commands.add_parser("replay", parents=[listing], help="run letters again")
    replay_cmd.add_argument("ids", type=int, nargs="*")
    replay_cmd.add_argument("--all", action="store_true", help="every letter the filters match")
    commands.add_parser("purge", help="mark letters purged").add_argument(
        "ids", type=int, nargs="+"
    )
    args = parser.parse_args(argv)
    tool = ToolSettings.checked(broker=args.command == "replay")
    if tool is None:
        return 1
    settings = tool.settings
    engine = make_engine(settings, application_name="orders-dlq")
    which = Filter(
        getattr(args, "task", None),
        getattr(args, "error", None),
        getattr(args, "older_than", None),
        getattr(args, "state", "open"),
        getattr(args, "limit", 100),
    )
    try:
        if args.command == "list":
            for letter in list_letters(engine, which):
                print(json.dumps(letter.summary()))
        elif args.command == "show":
            print(json.dumps(show(engine, args.id).detail(), indent=2))
        elif args.command == "replay":
            ids = args.ids or (
                [letter.id for letter in list_letters(engine, which)] if args.all else []
            )
            if not ids:
                parser.error("name the letters to replay, or --all with filters")
            app = create_celery(settings, publisher=True)
            for letter_id, task_id in replay(engine, app, ids, saga_registry(settings)).items():
                print(f"{letter_id} replayed as {task_id}")
        elif args.command == "purge":
            print(f"{purge(engine, args.ids)} purged")
    except DeadLetterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        return tool.report(exc)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
