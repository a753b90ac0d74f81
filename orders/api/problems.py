"""RFC 9457 problem details: every error the API returns is ``application/problem+json``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, json
from kombu.exceptions import OperationalError as BrokerOperationalError
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

from config.faults import is_transient
from orders.errors import (
    CreditPrecheckError,
    IdempotencyKeyReusedError,
    InvalidOrderError,
    OperationRefusedError,
    OperationTargetNotFoundError,
    OrderNotFoundError,
)

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: The broker unreachable while publishing (an operator's replay or run start).
BROKER_ERRORS = (BrokerOperationalError, RedisConnectionError, RedisTimeoutError)
#: Most entries of a problem's ``errors`` list; the rest are only counted
#: (``errors_omitted``), so a large bad body cannot make a larger answer.
MAX_ERRORS = 20
#: Longest text of an entry (a ``loc`` may name an unknown key the client made up).
MAX_ERROR_CHARS = 200


def problem(status: int, title: str, detail: str | None = None, **extensions: Any) -> Response:
    """A problem-details response."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extensions)
    return Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)


def capped_errors(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """``errors`` and ``errors_omitted`` extensions: the first MAX_ERRORS entries, and
    how many more there were. Long texts are cut to MAX_ERROR_CHARS."""
    shown = [{key: _cut(value) for key, value in error.items()} for error in errors[:MAX_ERRORS]]
    return {"errors": shown, "errors_omitted": max(0, len(errors) - MAX_ERRORS)}


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_ERROR_CHARS:
        return value[: MAX_ERROR_CHARS - 1] + "…"
    return value


def validation_problem(exc: ValidationError, title: str = "Invalid order") -> Response:
    """A 422 naming each field that failed validation (the first MAX_ERRORS), and why."""
    errors = [
        {"loc": ".".join(str(part) for part in error["loc"]), "msg": error["msg"]}
        for error in exc.errors(include_url=False, include_input=False)
    ]
    return problem(
        422,
        title,
        "the request body does not match the schema",
        **capped_errors(errors),
    )


def register_error_handlers(app: Flask) -> None:
    """Map every error to a problem response; unexpected ones to a bare 500."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        response = problem(exc.code or 500, exc.name, exc.description)
        for header in ("WWW-Authenticate", "Allow"):
            if exc.get_response().headers.get(header):
                response.headers[header] = exc.get_response().headers[header]
        return response

    @app.errorhandler(ValidationError)
    def invalid_body(exc: ValidationError) -> Response:
        return validation_problem(exc)

    @app.errorhandler(InvalidOrderError)
    def invalid_order(exc: InvalidOrderError) -> Response:
        title = "Credit limit exceeded" if isinstance(exc, CreditPrecheckError) else "Invalid order"
        return problem(422, title, exc.detail, **capped_errors(exc.errors))

    @app.errorhandler(IdempotencyKeyReusedError)
    def key_reused(exc: IdempotencyKeyReusedError) -> Response:
        return problem(422, "Idempotency-Key reused", str(exc))

    @app.errorhandler(OperationRefusedError)
    def refused(exc: OperationRefusedError) -> Response:
        if isinstance(exc, OperationTargetNotFoundError):
            return problem(404, "Not Found", str(exc))
        return problem(409, "Conflict", str(exc))

    for unreachable in BROKER_ERRORS:

        @app.errorhandler(unreachable)
        def broker_unavailable(exc: Exception) -> Response:
            logger.warning("broker unavailable: %r", exc)
            response = problem(503, "Service Unavailable", "the broker cannot be reached")
            response.headers["Retry-After"] = "5"
            return response

    @app.errorhandler(OrderNotFoundError)
    def not_found(exc: OrderNotFoundError) -> Response:
        return problem(404, "Not Found", str(exc))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        if is_transient(exc):  # the database unreachable, restarting, a deadlock...
            logger.warning("database unavailable: %r", exc)
            response = problem(503, "Service Unavailable", "the database cannot be reached")
            response.headers["Retry-After"] = "5"
            return response
        logger.exception("unhandled error", exc_info=exc)
        return problem(500, "Internal Server Error")
