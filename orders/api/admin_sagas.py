"""Operators' endpoints for sagas (an operator's key only, as every ``/admin`` route):
list them stuck first, show one, retry its missing steps, cancel it, run its failed
compensation again. Each action is the ``python -m workers.sagas`` command of that name."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlencode
from uuid import UUID

from flask import Blueprint, Response, request
from pydantic import BaseModel
from werkzeug.exceptions import BadRequest, NotFound

from orders.ports import Operations

#: The saga states, as a filter (either case) and as answered (upper case).
SAGA_STATES = ("RUNNING", "COMPENSATION_FAILED", "CONFIRMED", "CANCELLED")
#: Sagas one page holds: by default, and at most.
SAGAS_PAGE, MAX_SAGAS_PAGE = 50, 1000
#: A definition's name (sagas.name is VARCHAR(64)).
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
#: A paging cursor, as the list writes it (base64url, no padding).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,400}$"
#: The oldest age filter: ten years, in seconds.
MAX_AGE_SECONDS = 10 * 365 * 86400
ACTIONS = ("retry", "cancel", "retry-compensation")


class SagaOut(BaseModel):
    """One saga as the list shows it."""

    id: UUID
    name: str
    version: int
    state: str
    reason: str | None
    created_at: datetime
    #: When the sweeper looks next (active sagas; null when left to an operator).
    deadline_at: datetime | None
    finished_at: datetime | None
    #: Seconds since it was accepted (to when it finished, once final).
    age_seconds: float
    #: Active and past its deadline, or left to an operator.
    stuck: bool
    redrives: int
    recovery_attempts: int
    #: Each step's ledger status; PENDING: no outcome yet.
    steps: dict[str, str]


class SagasOut(BaseModel):
    """A page of sagas, stuck ones first; ``next``: the following page, if any."""

    sagas: list[SagaOut]
    next: str | None


class LedgerEntryOut(BaseModel):
    """One step as the ledger holds it."""

    step: str
    status: str
    reason: str | None
    attempts: int
    started_at: datetime
    finished_at: datetime
    compensated_at: datetime | None


class SagaDetailOut(SagaOut):
    """One saga in full."""

    #: Why its compensation failed (state COMPENSATION_FAILED).
    error: str | None
    trace_id: str | None
    payload: dict[str, Any]
    ledger: list[LedgerEntryOut]
    #: Accepted, each step started / finished / aborted / compensated, decided.
    timeline: list[dict[str, Any]]


class SagaActionOut(BaseModel):
    """What an action did, and where the saga stands."""

    saga_id: UUID
    action: Literal["retry", "cancel", "retry-compensation"]
    #: retry: redriven or completed; cancel: CANCELLED or COMPENSATION_FAILED;
    #: retry-compensation: CANCELLED or COMPENSATION_FAILED (failed again: see error).
    outcome: str
    state: str
    reason: str | None
    detail: str
    dispatched: list[str]
    compensated: list[str]
    error: str | None


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _saga_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise NotFound(f"no saga {text}") from None


def _matching(name: str, pattern: str, what: str) -> str | None:
    value = request.args.get(name)
    if value is not None and not re.fullmatch(pattern, value):
        raise BadRequest(f"{name} is {what}")
    return value


def add_saga_routes(bp: Blueprint, operations: Operations) -> None:
    """``/admin/sagas...`` on the operators' blueprint."""

    @bp.get("/admin/sagas")
    def list_sagas() -> Response:
        args = request.args
        states = [state.upper() for state in args.getlist("state")] or list(SAGA_STATES)
        if any(state not in SAGA_STATES for state in states):
            raise BadRequest(f"state is one of {', '.join(SAGA_STATES)} (either case)")
        try:
            older = float(args["older_than_seconds"]) if "older_than_seconds" in args else None
            limit = int(args.get("limit", SAGAS_PAGE))
        except ValueError:
            raise BadRequest("older_than_seconds and limit are numbers") from None
        if older is not None and not 0 <= older <= MAX_AGE_SECONDS:
            raise BadRequest("older_than_seconds is between 0 and ten years")
        if not 1 <= limit <= MAX_SAGAS_PAGE:
            raise BadRequest(f"limit is between 1 and {MAX_SAGAS_PAGE}")
        name = _matching("name", NAME_PATTERN, "a saga definition's name")
        after = _matching("after", CURSOR_PATTERN, "the cursor of a previous page's next")
        try:
            sagas, cursor = operations.sagas(
                states=states, name=name, older_than_seconds=older, limit=limit, after=after
            )
        except ValueError:
            raise BadRequest("after is not a cursor of this list") from None
        following = None
        if cursor is not None:
            params = [("state", state) for state in args.getlist("state")]
            params += [(key, args[key]) for key in ("name", "older_than_seconds") if key in args]
            params += [("limit", str(limit)), ("after", cursor)]
            following = f"/admin/sagas?{urlencode(params)}"
        return _json({"sagas": sagas, "next": following})

    @bp.get("/admin/sagas/<saga_id>")
    def show_saga(saga_id: str) -> Response:
        found = operations.saga(_saga_id(saga_id))
        if found is None:
            raise NotFound(f"no saga {saga_id}")
        return _json(found)

    def action(name: str, status: int) -> None:
        def act(saga_id: str) -> Response:
            return _json(operations.saga_action(_saga_id(saga_id), name), status)

        act.__name__ = f"saga_{name.replace('-', '_')}"
        bp.post(f"/admin/sagas/<saga_id>/{name}")(act)

    action("retry", 202)  # the steps run on the workers
    action("cancel", 200)
    action("retry-compensation", 200)
