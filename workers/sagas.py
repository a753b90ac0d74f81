"""Operators' tools for sagas (orders, refunds, any saga of the engine):

    python -m workers.sagas list [--state running] [--name order] [--older-than 1h]
                                 [--limit 50] [--after CURSOR]
    python -m workers.sagas show SAGA_ID
    python -m workers.sagas retry SAGA_ID               dispatch its missing steps now
    python -m workers.sagas cancel SAGA_ID              cancel it (operator_cancelled)
    python -m workers.sagas retry-compensation SAGA_ID  run its failed compensation now

``list`` shows stuck sagas first: those left to an operator, then those past their
deadline (longest overdue first), then the other running ones, then finished ones (most
recent first). Tables by default; ``--json`` prints JSON (a line per saga for ``list``).

Exit status: 0 done; 1 refused (the saga's state does not allow it: the message says
why and what to do), a compensation that failed again, or PostgreSQL or Redis
unreachable; 2 a wrong command line, or no such saga.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from celery import Celery
from sqlalchemy import Engine

from config.settings import Settings
from sagas import operations
from sagas.engine import SagaState
from sagas.operations import SagaTools
from sagas.registry import SagaRegistry
from workers.escalation import escalate_compensation
from workers.runtime import recovery_policy

#: Exit statuses.
DONE, REFUSED, USAGE = 0, 1, 2
ACTIONS = ("retry", "cancel", "retry-compensation")


def saga_tools(engine: Engine, app: Celery, settings: Settings, sagas: SagaRegistry) -> SagaTools:
    """The saga tools wired as the workers run sagas: the process's sagas by name and
    version, their recovery policy, and a compensation given up becoming a dead letter."""
    return SagaTools(engine, app, sagas.get, recovery_policy(settings), escalate_compensation)


def run_action(tools: SagaTools, action: str, saga_id: UUID) -> operations.ActionResult:
    """Carry out one of ACTIONS; a compensation that ends CANCELLED resolves the dead
    letter that gave it up to an operator, if any."""
    if action == "retry":
        return tools.retry(saga_id)
    if action == "cancel":
        return tools.cancel(saga_id)
    done = tools.retry_compensation(saga_id)
    if done.state == SagaState.CANCELLED:
        from workers import dlq

        with tools.engine.begin() as conn:
            dlq.resolve_in(conn, f"{saga_id}.compensation")
    return done


def short_age(seconds: float) -> str:
    """'45s', '12m', '3h05', '2d04': two units at most."""
    seconds = int(abs(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned under their headers."""
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[n]) for row in cells) for n in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _deadline(row: dict[str, Any], now: datetime) -> str:
    if row["state"] not in ("RUNNING", "COMPENSATION_FAILED"):
        return "-"
    if row["deadline_at"] is None:
        return "operator"
    left = (datetime.fromisoformat(row["deadline_at"]) - now).total_seconds()
    return f"in {short_age(left)}" if left >= 0 else f"{short_age(left)} ago"


def format_list(rows: Sequence[dict[str, Any]]) -> str:
    """The sagas as a table (``!``: stuck)."""
    now = datetime.now(UTC)
    body = [
        [
            "!" if row["stuck"] else "",
            row["id"],
            f"{row['name']} v{row['version']}" + (f" s{row['stage']}" if row["stage"] else ""),
            row["state"],
            row["reason"] or "-",
            short_age(row["age_seconds"]),
            _deadline(row, now),
            row["redrives"],
            row["recovery_attempts"],
            " ".join(f"{step}={status}" for step, status in row["steps"].items()),
        ]
        for row in rows
    ]
    headers = ["", "SAGA", "NAME", "STATE", "REASON", "AGE", "DEADLINE", "REDRIVES", "TRIES"]
    return table([*headers, "STEPS"], body)


def format_detail(saga: dict[str, Any]) -> str:
    """One saga: its fields, ledger and timeline."""
    fields = [
        ("saga", saga["id"]),
        ("name", f"{saga['name']} (version {saga['version']}, stage {saga['stage']})"),
        ("state", saga["state"] + (" (stuck)" if saga["stuck"] else "")),
        ("reason", saga["reason"] or "-"),
        ("accepted", saga["created_at"]),
        ("finished", saga["finished_at"] or "-"),
        ("deadline", saga["deadline_at"] or "-"),
        ("age", short_age(saga["age_seconds"])),
        ("redrives", saga["redrives"]),
        ("recovery tries", saga["recovery_attempts"]),
        ("trace", saga["trace_id"] or "-"),
        ("error", saga["error"] or "-"),
    ]
    ledger = table(
        ["STEP", "STATUS", "REASON", "ATTEMPTS", "STARTED", "FINISHED", "COMPENSATED"],
        [
            [
                step["step"],
                step["status"],
                step["reason"] or "-",
                step["attempts"],
                step["started_at"],
                step["finished_at"],
                step["compensated_at"] or "-",
            ]
            for step in saga["ledger"]
        ],
    )
    pending = [step for step, status in saga["steps"].items() if status == operations.PENDING]
    timeline = "\n".join(
        f"  {event['at']}  {event['event']}"
        + "".join(f" {key}={value}" for key, value in event.items() if key not in ("at", "event"))
        for event in saga["timeline"]
    )
    return "\n".join(
        [
            *(f"{name + ':':16}{value}" for name, value in fields),
            "",
            "ledger:" + (f" (no outcome yet: {', '.join(pending)})" if pending else ""),
            ledger,
            "",
            "timeline:",
            timeline,
        ]
    )


def format_result(done: dict[str, Any]) -> str:
    """What an action did."""
    line = f"saga {done['saga_id']}: {done['action']} -> {done['outcome']}: {done['detail']}"
    state = f"now {done['state']}" + (f" ({done['reason']})" if done["reason"] else "")
    error = f"\nerror: {done['error']}" if done.get("error") else ""
    return f"{line}\n{state}{error}"


def _parser() -> argparse.ArgumentParser:
    from workers.dlq import parse_age

    parser = argparse.ArgumentParser(
        prog="python -m workers.sagas",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing = commands.add_parser("list", parents=[output], help="sagas, stuck ones first")
    listing.add_argument(
        "--state",
        action="append",
        type=str.upper,
        choices=[state.value for state in SagaState],
        help="either case; repeat for several (default: every state)",
    )
    listing.add_argument("--name", help="only sagas of this definition (order, refund...)")
    listing.add_argument("--older-than", type=parse_age, help="accepted at least this long ago")
    listing.add_argument("--limit", type=_page_size, default=50)
    listing.add_argument("--after", metavar="CURSOR", help="the page after this cursor")
    commands.add_parser("show", parents=[output], help="one saga in full").add_argument(
        "saga_id", type=UUID
    )
    for action, text in zip(
        ACTIONS,
        (
            "dispatch a running saga's steps that have no outcome, now",
            "cancel a running saga (reason operator_cancelled), compensating what it applied",
            "run a failed compensation now",
        ),
        strict=True,
    ):
        commands.add_parser(action, parents=[output], help=text).add_argument("saga_id", type=UUID)
    return parser


def _page_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= operations.MAX_PAGE:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to {operations.MAX_PAGE}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """The operators' command line (settings from the environment, completed from the
    ``.run/env`` of ``make run``; what is missing is said plainly)."""
    from config.cli import ToolSettings
    from config.database import make_engine
    from workers.celery_app import create_celery
    from workers.runtime import Runtime

    args = _parser().parse_args(argv)
    tool = ToolSettings.checked(broker=args.command == "retry")
    if tool is None:
        return REFUSED
    settings = tool.settings
    engine = make_engine(settings, application_name="orders-sagas")
    app = create_celery(settings, publisher=True)
    tools = saga_tools(engine, app, settings, Runtime(settings).sagas)
    try:
        return _command(tools, args)
    except operations.SagaNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except operations.BadCursorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except operations.SagaActionRefusedError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return REFUSED
    except Exception as exc:
        return tool.report(exc)
    finally:
        engine.dispose()
        app.close()


def _command(tools: SagaTools, args: argparse.Namespace) -> int:
    if args.command == "list":
        states = tuple(SagaState(state) for state in args.state or [s.value for s in SagaState])
        query = operations.SagaQuery(states, args.name, args.older_than, args.limit, args.after)
        page = tools.list(query)
        rows = [row.to_dict() for row in page.sagas]
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(format_list(rows) if rows else "no saga matches")
        if page.next:
            print(f"more: add --after {page.next}", file=sys.stderr)
        return DONE
    if args.command == "show":
        detail = tools.show(args.saga_id).to_dict()
        print(json.dumps(detail, indent=2) if args.json else format_detail(detail))
        return DONE
    done = run_action(tools, args.command, args.saga_id).to_dict()
    print(json.dumps(done) if args.json else format_result(done))
    return REFUSED if done["state"] == SagaState.COMPENSATION_FAILED else DONE


if __name__ == "__main__":
    sys.exit(main())
