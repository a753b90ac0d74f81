"""Operators' endpoints: the dead-letter queue, batch runs, the credit check's findings and
the sagas (``admin_sagas``), an operator's key only."""

from __future__ import annotations

import json
import unicodedata
from typing import Annotated, Any
from uuid import UUID

from flask import Blueprint, Response, request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from sqlalchemy import Engine
from werkzeug.exceptions import BadRequest, NotFound

from config.settings import Settings
from orders.api.admin_sagas import add_saga_routes
from orders.api.auth import require_key
from orders.api.bodies import read_json
from orders.api.problems import validation_problem
from orders.api.schemas import whole_number
from orders.ports import Operations

#: Ids are PostgreSQL BIGINTs.
MAX_ID = 2**63 - 1
#: Longest text filter (a task name, a piece of an error message).
MAX_FILTER_CHARS = 200
#: The dead letters' states, as a filter (either case) and as answered (upper case).
LETTER_STATES = ("OPEN", "REPLAYED", "PURGED")
#: Credit reviews one page holds: by default, and at most.
REVIEWS_PAGE, MAX_REVIEWS_PAGE = 100, 1000


class LetterIds(BaseModel):
    """The letters an operation applies to."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: Annotated[
        list[Annotated[int, Field(ge=1, le=MAX_ID), BeforeValidator(whole_number)]],
        Field(min_length=1, max_length=1000),
    ]


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _text_filter(name: str) -> str | None:
    """A text filter of the query string: at most MAX_FILTER_CHARS, no control character
    (a NUL cannot even reach PostgreSQL)."""
    value = request.args.get(name)
    if value is None:
        return None
    if len(value) > MAX_FILTER_CHARS:
        raise BadRequest(f"{name} is at most {MAX_FILTER_CHARS} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise BadRequest(f"{name} must not hold control characters")
    return value


def _known_id(letter_id: int) -> None:
    if letter_id > MAX_ID:
        raise NotFound(f"no dead letter {letter_id}")


def admin_blueprint(settings: Settings, engine: Engine, operations: Operations) -> Blueprint:
    """``/admin/...`` and ``/batches/<id>``, behind an operator's key."""
    bp = Blueprint("admin", __name__)

    def body(model: type[BaseModel]) -> Any:
        return model.model_validate(read_json(settings.max_body_bytes))

    @bp.before_request
    def authenticate() -> None:
        require_key(engine, operator=True)

    @bp.errorhandler(ValidationError)
    def invalid_body(exc: ValidationError) -> Response:
        return validation_problem(exc, title="Invalid request")

    @bp.get("/admin/dead-letters")
    def list_dead_letters() -> Response:
        args = request.args
        state = args.get("state", "open").upper()
        if state not in LETTER_STATES:
            raise BadRequest("state is open, replayed or purged (either case)")
        try:
            older = float(args["older_than_seconds"]) if "older_than_seconds" in args else None
            limit = int(args.get("limit", 100))
        except ValueError:
            raise BadRequest("older_than_seconds and limit are numbers") from None
        if older is not None and not 0 <= older <= 10 * 365 * 86400:
            raise BadRequest("older_than_seconds is between 0 and ten years")
        if not 1 <= limit <= 1000:
            raise BadRequest("limit is between 1 and 1000")
        letters = operations.dead_letters(
            task=_text_filter("task"),
            error=_text_filter("error"),
            older_than_seconds=older,
            state=state,
            limit=limit,
        )
        return _json({"dead_letters": letters})

    @bp.get("/admin/dead-letters/<int:letter_id>")
    def show_dead_letter(letter_id: int) -> Response:
        _known_id(letter_id)
        letter = operations.dead_letter(letter_id)
        if letter is None:
            raise NotFound(f"no dead letter {letter_id}")
        return _json(letter)

    @bp.post("/admin/dead-letters/<int:letter_id>/replay")
    def replay_one(letter_id: int) -> Response:
        _known_id(letter_id)
        return _json({"replayed": operations.replay([letter_id])}, 202)

    @bp.post("/admin/dead-letters/replay")
    def replay_many() -> Response:
        return _json({"replayed": operations.replay(body(LetterIds).ids)}, 202)

    @bp.post("/admin/dead-letters/purge")
    def purge() -> Response:
        return _json({"purged": operations.purge(body(LetterIds).ids)})

    @bp.post("/admin/batches/credit-check")
    def start_credit_check() -> Response:
        run_id = operations.start_credit_check()
        response = _json({"run_id": run_id, "links": {"self": f"/batches/{run_id}"}}, 202)
        response.headers["Location"] = f"/batches/{run_id}"
        return response

    @bp.get("/admin/credit-reviews")
    def list_credit_reviews() -> Response:
        args = request.args
        flagged = args.get("flagged", "true").lower()
        if flagged not in ("true", "false"):
            raise BadRequest("flagged is true or false")
        try:
            limit = int(args.get("limit", REVIEWS_PAGE))
        except ValueError:
            raise BadRequest("limit is a number") from None
        if not 1 <= limit <= MAX_REVIEWS_PAGE:
            raise BadRequest(f"limit is between 1 and {MAX_REVIEWS_PAGE}")
        after = _text_filter("after")  # the last customer id of the previous page
        # One more than asked: whether there is a next page.
        reviews = operations.credit_reviews(
            flagged_only=flagged == "true", limit=limit + 1, after=after
        )
        following = None
        if len(reviews) > limit:
            reviews = reviews[:limit]
            last = reviews[-1]["customer_id"]
            following = f"/admin/credit-reviews?flagged={flagged}&limit={limit}&after={last}"
        return _json({"credit_reviews": reviews, "next": following})

    @bp.get("/batches/<run_id>")
    def batch_run(run_id: str) -> Response:
        try:
            found = operations.batch_run(UUID(run_id))
        except ValueError:
            found = None
        if found is None:
            raise NotFound(f"no batch run {run_id}")
        return _json(found)

    add_saga_routes(bp, operations)
    return bp
