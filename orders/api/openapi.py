"""The OpenAPI 3.1 document, built from the pydantic models the endpoints validate with and
from the settings whose limits the API enforces (lines per order, quantity per line).

Every operation lists every status it can answer; the bounds it checks are in the schemas
(patterns, lengths, minimum and maximum), so that a request valid by the document is one
the API accepts and anything else is refused with a 4xx problem. The contract is checked
against the real server by tests/e2e/test_openapi_conformance.py (schemathesis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from config.settings import Settings
from orders.api.admin import (
    LETTER_STATES,
    MAX_FILTER_CHARS,
    MAX_ID,
    MAX_REVIEWS_PAGE,
    REVIEWS_PAGE,
    LetterIds,
)
from orders.api.admin_sagas import (
    CURSOR_PATTERN,
    MAX_SAGAS_PAGE,
    NAME_PATTERN,
    SAGA_STATES,
    SAGAS_PAGE,
    SagaActionOut,
    SagaDetailOut,
    SagasOut,
)
from orders.api.routes import MAX_IDEMPOTENCY_KEY, MAX_PAGE_SIZE, MAX_STATUS_IDS, PAGE_SIZE
from orders.api.schemas import (
    REF_PATTERN,
    AcceptedOut,
    ActionOut,
    BatchRunOut,
    CreditOut,
    CreditReviewsOut,
    CustomerOrdersOut,
    CustomerSummaryOut,
    DeadLetterDetailOut,
    DeadLettersOut,
    HealthOut,
    OrderIn,
    OrderOut,
    Problem,
    PurgedOut,
    ReadyOut,
    ReplayedOut,
    RunStartedOut,
    StatusesOut,
    StatusOut,
    TimelineOut,
)
from orders.api.webhooks import (
    DELIVERIES_PAGE,
    MAX_DELIVERIES_PAGE,
    DeliveriesOut,
    DeliveryReplayedOut,
    WebhookIn,
    WebhookSecretOut,
    WebhooksOut,
)
from orders.webhooks import url_pattern

_REF = "#/components/schemas/{model}"
PROBLEM_JSON = "application/problem+json"
#: A UUID as the API writes it (and as every id it hands out looks).
UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
#: Most dead letters one list answers.
MAX_LETTERS = 1000
#: What a text filter of the dead-letter list may not hold: control characters
#: (Unicode category Cc).
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f-\x9f]*$"
#: The oldest age filter of the dead-letter list: ten years, in seconds.
MAX_AGE_SECONDS = 10 * 365 * 86400

_REASONS = {
    400: "Malformed request: not JSON, a header or query parameter out of its bounds",
    401: "Missing or unknown API key (WWW-Authenticate: Bearer)",
    403: "The key is a client's: operator endpoints need an operator's key",
    404: "Not found, or outside the key's customers (answered as if it did not exist)",
    409: "The operation conflicts with the target's state",
    413: "Body larger than the service's limit",
    415: "Body is not application/json",
    422: "Well-formed but invalid (schema, unknown customer or product, limits, reused key)",
    429: "Too many requests for this key: wait Retry-After seconds",
    503: "Unavailable (database or broker unreachable, or too much work waiting): retry "
    "after Retry-After seconds",
}
_RETRY_AFTER = {
    "description": "Seconds to wait before trying again",
    "required": True,
    "schema": {"type": "integer", "minimum": 0},
}
#: The rate limit's state (IETF draft RateLimit header fields), sent with a 429.
_RATE_LIMIT_HEADERS = {
    name: {"description": text, "schema": {"type": "string"}}
    for name, text in (
        ("RateLimit-Limit", "Requests allowed in the window"),
        ("RateLimit-Remaining", "Requests left in the window"),
        ("RateLimit-Reset", "Seconds until the window resets"),
    )
}
#: The statuses any operation behind an API key may answer, besides its own.
_KEYED = (401, 429, 503)


def _components(*models: type[BaseModel]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _problems(*codes: int) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    for code in sorted(set(codes)):
        answer: dict[str, Any] = {
            "description": _REASONS[code],
            "content": {PROBLEM_JSON: {"schema": _ref(Problem)}},
        }
        if code == 401:
            answer["headers"] = {
                "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
            }
        if code == 429:
            answer["headers"] = {"Retry-After": _RETRY_AFTER, **_RATE_LIMIT_HEADERS}
        if code == 503:
            answer["headers"] = {"Retry-After": _RETRY_AFTER}
        answers[str(code)] = answer
    return answers


def _ok(model: type[BaseModel], description: str, status: int = 200) -> dict[str, Any]:
    return {
        str(status): {
            "description": description,
            "content": {"application/json": {"schema": _ref(model)}},
        }
    }


def _path(name: str, text: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": text, "schema": schema}


def _query(name: str, text: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": text,
        "schema": schema,
    }


ORDER_ID = _path("order_id", "the order's id", {"type": "string", "format": "uuid"})
CUSTOMER_ID = _path(
    "customer_id",
    "the customer's id (another id names no customer: 404)",
    {"type": "string", "pattern": REF_PATTERN},
)
LETTER_ID = _path(
    "letter_id", "the dead letter's id", {"type": "integer", "minimum": 1, "maximum": MAX_ID}
)
RUN_ID = _path("run_id", "the batch run's id", {"type": "string", "format": "uuid"})
SAGA_ID = _path("saga_id", "the saga's id", {"type": "string", "format": "uuid"})


def _get(
    summary: str,
    parameters: list[dict[str, Any]],
    ok: dict[str, Any],
    *codes: int,
    operator: bool = False,
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "parameters": parameters,
        "responses": {**ok, **_problems(*_KEYED, *codes, *((403,) if operator else ()))},
    }
    if operator:
        operation.update(tags=["operators"], security=[{"operator": []}])
    return {"get": operation}


def _letter_ids() -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": _ref(LetterIds)}},
    }


def _text_filter() -> dict[str, Any]:
    return {"type": "string", "maxLength": MAX_FILTER_CHARS, "pattern": NO_CONTROL_CHARACTERS}


def _order_paths(settings: Settings) -> dict[str, Any]:
    idempotency_key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "A retried POST with the same key returns the same order (202); the "
        "same key with another body is refused (422). 1 to "
        f"{MAX_IDEMPOTENCY_KEY} visible ASCII characters; a quoted string (RFC 8941) "
        "counts without its quotes, so it may not be empty.",
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_IDEMPOTENCY_KEY,
            "pattern": f"^[!-~]{{1,{MAX_IDEMPOTENCY_KEY}}}$",
            "not": {"const": '""'},
        },
    }
    timeline = _get(
        "The saga's steps with start and end times, outcome and attempts",
        [ORDER_ID],
        _ok(TimelineOut, "The timeline"),
        404,
    )
    page = _get(
        "The saga drawn as bars on a time axis (HTML, no script)",
        [ORDER_ID],
        {
            "200": {
                "description": "The page",
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
        404,
    )
    return {
        "/orders": {
            "post": {
                "summary": "Accept an order and start its saga",
                "description": "The customer and every product must exist, and each product "
                f"may be listed once; at most {settings.max_order_lines} lines of at most "
                f"{settings.max_line_quantity} each, in a body of at most "
                f"{settings.max_body_bytes} bytes. Whether stock and credit suffice is the "
                "saga's decision: follow Location.",
                "parameters": [idempotency_key],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(OrderIn)}},
                },
                "responses": {
                    "202": {
                        "description": "Accepted; the saga runs. Location: the status URL.",
                        "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": _ref(AcceptedOut)}},
                    },
                    **_problems(*_KEYED, 400, 404, 413, 415, 422),
                },
            }
        },
        "/orders/status": _get(
            f"Up to {MAX_STATUS_IDS} orders' statuses (one cache lookup, one query for the misses)",
            [
                _query(
                    "ids",
                    f"1 to {MAX_STATUS_IDS} order ids separated by commas",
                    {
                        "type": "string",
                        "pattern": f"^{UUID_PATTERN}(,{UUID_PATTERN}){{0,{MAX_STATUS_IDS - 1}}}$",
                    },
                    required=True,
                )
            ],
            _ok(StatusesOut, "The statuses found, and the ids that name no order"),
            400,
        ),
        "/orders/{order_id}": _get(
            "The order with its lines", [ORDER_ID], _ok(OrderOut, "The order"), 404
        ),
        "/orders/{order_id}/status": _get(
            "The order's status", [ORDER_ID], _ok(StatusOut, "The status"), 404
        ),
        "/orders/{order_id}/timeline": timeline,
        "/orders/{order_id}/timeline.html": page,
        "/orders/{order_id}/cancel": _action(
            "Cancel the order (a refund when it was confirmed first)",
            "A PENDING order is cancelled at once (reason customer_cancelled): what its "
            "saga reserved is released, whether the cancel or the saga's own decision "
            "comes first. If the saga confirmed first, the cancel starts a refund; the "
            "answer's outcome says which. A refund under way or done answers that refund. "
            "A CANCELLED order (or one being cancelled): 409, nothing changes.",
            idempotency_key,
        ),
        "/orders/{order_id}/refund": _action(
            "Refund a confirmed order: a saga returns its stock and its credit",
            "The refund saga returns the units on hand and the amount to the customer's "
            "credit, in parallel, then the order is REFUNDED (follow Location). Asked "
            "again while it runs, or once the order is REFUNDED: the same refund. A refund "
            "that fails leaves the order CONFIRMED (event OrderRefundFailed); it may be "
            "asked for again. An order not CONFIRMED: 409.",
            idempotency_key,
        ),
    }


def _action(summary: str, description: str, idempotency_key: dict[str, Any]) -> dict[str, Any]:
    key = {
        **idempotency_key,
        "description": "A retried request with the same key gets the same answer (202); "
        "the same key for another order or action is refused (422). "
        + idempotency_key["description"].split(". ", 1)[1],
    }
    return {
        "post": {
            "summary": summary,
            "description": description,
            "parameters": [ORDER_ID, key],
            "responses": {
                "202": {
                    "description": "Done (cancelled) or started (refund). Location: the "
                    "status URL.",
                    "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": _ref(ActionOut)}},
                },
                **_problems(*_KEYED, 400, 404, 409, 422),
            },
        }
    }


def _customer_paths() -> dict[str, Any]:
    return {
        "/customers/{customer_id}/orders": _get(
            "The customer's orders with their lines, newest first, a page at a time",
            [
                CUSTOMER_ID,
                _query(
                    "limit",
                    f"orders per page, 1 to {MAX_PAGE_SIZE}",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE_SIZE,
                        "default": PAGE_SIZE,
                    },
                ),
                _query(
                    "after",
                    "the cursor in the previous page's next link (any other value: 400)",
                    {"type": "string", "pattern": "^[A-Za-z0-9_-]+={0,2}$"},
                ),
            ],
            _ok(CustomerOrdersOut, "A page of orders"),
            400,
            404,
        ),
        "/customers/{customer_id}/summary": _get(
            "The customer's orders at a glance (kept from the order events)",
            [CUSTOMER_ID],
            _ok(CustomerSummaryOut, "The summary"),
            404,
        ),
        "/customers/{customer_id}/credit": _get(
            "The customer's credit: limit, used, reserved, available (cached)",
            [CUSTOMER_ID],
            _ok(CreditOut, "The credit"),
            404,
        ),
    }


def _operator_paths() -> dict[str, Any]:
    def post(summary: str, ok: dict[str, Any], *codes: int, **more: Any) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "tags": ["operators"],
                "security": [{"operator": []}],
                **more,
                "responses": {**ok, **_problems(*_KEYED, 403, *codes)},
            }
        }

    return {
        "/admin/dead-letters": _get(
            "Dead letters matching a filter, most recent failure first",
            [
                _query(
                    "state",
                    "the letters' state, in either case (answers spell it in upper case)",
                    {
                        "type": "string",
                        "enum": [
                            *(state.lower() for state in LETTER_STATES),
                            *LETTER_STATES,
                        ],
                        "default": "open",
                    },
                ),
                _query("task", "only this task's letters", _text_filter()),
                _query(
                    "error",
                    "only letters whose error contains this text (case-insensitive)",
                    _text_filter(),
                ),
                _query(
                    "older_than_seconds",
                    "only letters whose last failure is at least this old",
                    {"type": "number", "minimum": 0, "maximum": MAX_AGE_SECONDS},
                ),
                _query(
                    "limit",
                    f"letters at most, 1 to {MAX_LETTERS}",
                    {"type": "integer", "minimum": 1, "maximum": MAX_LETTERS, "default": 100},
                ),
            ],
            _ok(DeadLettersOut, "The letters"),
            400,
            operator=True,
        ),
        "/admin/dead-letters/{letter_id}": _get(
            "One dead letter in full (traceback, raw message)",
            [LETTER_ID],
            _ok(DeadLetterDetailOut, "The letter"),
            404,
            operator=True,
        ),
        "/admin/dead-letters/{letter_id}/replay": post(
            "Run one letter's task again (a saga step resumes its saga)",
            _ok(ReplayedOut, "Replayed", 202),
            404,
            409,
            parameters=[LETTER_ID],
        ),
        "/admin/dead-letters/replay": post(
            "Run letters again: each must be open and hold a task, or nothing is replayed",
            _ok(ReplayedOut, "Replayed", 202),
            400,
            404,
            409,
            413,
            415,
            422,
            requestBody=_letter_ids(),
        ),
        "/admin/dead-letters/purge": post(
            "Mark letters purged (kept for the record); letters not open are left alone",
            _ok(PurgedOut, "Purged"),
            400,
            413,
            415,
            422,
            requestBody=_letter_ids(),
        ),
        "/admin/batches/credit-check": post(
            "Start a credit check run of every customer now",
            {
                "202": {
                    "description": "Started; Location: its progress",
                    "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": _ref(RunStartedOut)}},
                }
            },
        ),
        "/admin/credit-reviews": _get(
            "The credit check's findings: each customer's latest review, by customer id",
            [
                _query(
                    "flagged",
                    "true: only the customers flagged (over their limit, or credit figures "
                    "that disagree with their orders); false: every review",
                    {"type": "string", "enum": ["true", "false"], "default": "true"},
                ),
                _query(
                    "limit",
                    f"reviews at most, 1 to {MAX_REVIEWS_PAGE}",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_REVIEWS_PAGE,
                        "default": REVIEWS_PAGE,
                    },
                ),
                _query(
                    "after",
                    "only customers whose id sorts after this (the last of the previous page: "
                    "see next)",
                    _text_filter(),
                ),
            ],
            _ok(CreditReviewsOut, "A page of reviews; next: the following page, if any"),
            400,
            operator=True,
        ),
        **_saga_paths(post),
        "/batches/{run_id}": _get(
            "A batch run's progress",
            [RUN_ID],
            _ok(BatchRunOut, "The run"),
            404,
            operator=True,
        ),
    }


def _saga_paths(post: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    def action(summary: str, description: str, status: int) -> dict[str, Any]:
        answer = "Dispatched" if status == 202 else "Done"
        return post(
            summary,
            _ok(SagaActionOut, answer, status),
            404,
            409,
            description=description,
            parameters=[SAGA_ID],
        )

    return {
        "/admin/sagas": _get(
            "Sagas (orders, refunds...), stuck first: left to an operator, past their "
            "deadline (longest overdue first), the other running ones, then finished ones "
            "(most recent first)",
            [
                {
                    **_query(
                        "state",
                        "only sagas in these states (repeat the parameter; either case); "
                        "default: every state",
                        {
                            "type": "array",
                            "items": {
                                "type": "string",
                                "enum": [
                                    *(state.lower() for state in SAGA_STATES),
                                    *SAGA_STATES,
                                ],
                            },
                        },
                    ),
                    "style": "form",
                    "explode": True,
                },
                _query(
                    "name",
                    "only sagas of this definition (order, refund...)",
                    {"type": "string", "pattern": NAME_PATTERN},
                ),
                _query(
                    "older_than_seconds",
                    "only sagas accepted at least this long ago",
                    {"type": "number", "minimum": 0, "maximum": MAX_AGE_SECONDS},
                ),
                _query(
                    "limit",
                    f"sagas at most, 1 to {MAX_SAGAS_PAGE}",
                    {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_SAGAS_PAGE,
                        "default": SAGAS_PAGE,
                    },
                ),
                _query(
                    "after",
                    "the cursor in the previous page's next (any other value: 400)",
                    {"type": "string", "pattern": CURSOR_PATTERN},
                ),
            ],
            _ok(SagasOut, "A page of sagas; next: the following page, if any"),
            400,
            operator=True,
        ),
        "/admin/sagas/{saga_id}": _get(
            "One saga in full: its ledger (every step's status, reason, attempts, times), "
            "timeline, error and trace id",
            [SAGA_ID],
            _ok(SagaDetailOut, "The saga"),
            404,
            operator=True,
        ),
        "/admin/sagas/{saga_id}/retry": action(
            "Dispatch a RUNNING saga's steps that have no outcome, now",
            "Steps that already have an outcome return it again (they are idempotent); "
            "counted as a redrive. A saga whose every step has an outcome is completed "
            "now instead. A saga not RUNNING: 409, with its state and what to do.",
            202,
        ),
        "/admin/sagas/{saga_id}/cancel": action(
            "Cancel a RUNNING saga (reason operator_cancelled)",
            "Its steps without an outcome never take effect, its applied steps are "
            "compensated, and its domain records the cancellation (an order: CANCELLED "
            "with operator_cancelled). A compensation that fails leaves it "
            "COMPENSATION_FAILED, retried by the sweeper. A saga decided first, or not "
            "RUNNING: 409.",
            200,
        ),
        "/admin/sagas/{saga_id}/retry-compensation": action(
            "Run a COMPENSATION_FAILED saga's compensation now",
            "The answer says what happened: CANCELLED, or COMPENSATION_FAILED again with "
            "the error (the sweeper's retries go on; past COMPENSATION_MAX_ATTEMPTS it is "
            "left to an operator). A saga in another state: 409.",
            200,
        ),
    }


def _webhook_paths() -> dict[str, Any]:
    webhook_id = _path("webhook_id", "the endpoint's id", {"type": "string", "format": "uuid"})
    delivery_id = _path("delivery_id", "the delivery's id", {"type": "string", "format": "uuid"})

    def op(summary: str, ok: dict[str, Any], *codes: int, **more: Any) -> dict[str, Any]:
        return {
            "summary": summary,
            "tags": ["webhooks"],
            **more,
            "responses": {**ok, **_problems(*_KEYED, *codes)},
        }

    secret_answer = {
        "description": "The endpoint and its secret (shown this once)",
        "content": {"application/json": {"schema": _ref(WebhookSecretOut)}},
    }
    return {
        "/webhooks": {
            "post": op(
                "Register a URL for the final states of the orders this key places",
                {
                    "201": {
                        **secret_answer,
                        "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                    }
                },
                400,
                409,
                413,
                415,
                422,
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref(WebhookIn)}},
                },
            ),
            "get": op("This key's endpoints", _ok(WebhooksOut, "The endpoints")),
        },
        "/webhooks/{webhook_id}": {
            "delete": op(
                "Stop sending to the endpoint (its delivery log is kept)",
                {"204": {"description": "Deleted"}},
                404,
                parameters=[webhook_id],
            )
        },
        "/webhooks/{webhook_id}/rotate": {
            "post": op(
                "A new secret; the previous one still signs, as a second signature, for "
                "WEBHOOK_ROTATION_GRACE_SECONDS",
                {"200": secret_answer},
                404,
                parameters=[webhook_id],
            )
        },
        "/webhooks/{webhook_id}/deliveries": {
            "get": op(
                "The endpoint's latest deliveries, newest first, with their attempts",
                _ok(DeliveriesOut, "The deliveries"),
                400,
                404,
                parameters=[
                    webhook_id,
                    _query(
                        "limit",
                        f"deliveries at most, 1 to {MAX_DELIVERIES_PAGE}",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_DELIVERIES_PAGE,
                            "default": DELIVERIES_PAGE,
                        },
                    ),
                ],
            )
        },
        "/webhooks/deliveries/{delivery_id}/replay": {
            "post": op(
                "Send a DEAD delivery again, its attempts counted from zero",
                _ok(DeliveryReplayedOut, "Due now", 202),
                404,
                409,
                parameters=[delivery_id],
            )
        },
    }


def _open_paths() -> dict[str, Any]:
    def get(summary: str, ok: dict[str, Any], *codes: int) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                "security": [],
                "responses": {**ok, **_problems(*codes)},
            }
        }

    return {
        "/healthz": get("Liveness: the process runs", _ok(HealthOut, "Alive")),
        "/readyz": get("Readiness: database and Redis reachable", _ok(ReadyOut, "Ready"), 503),
        "/metrics": get(
            "Prometheus metrics of every API process",
            {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        ),
        "/openapi.json": get(
            "This document",
            {
                "200": {
                    "description": "The document",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        ),
    }


def openapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """The API described for clients and contract tests; the limits that are settings
    (lines per order, quantity per line, body size) are those of ``settings``."""
    settings = settings or Settings()
    schemas = _components(
        OrderIn,
        AcceptedOut,
        ActionOut,
        OrderOut,
        StatusOut,
        StatusesOut,
        CustomerOrdersOut,
        CustomerSummaryOut,
        CreditOut,
        TimelineOut,
        HealthOut,
        ReadyOut,
        LetterIds,
        DeadLettersOut,
        DeadLetterDetailOut,
        ReplayedOut,
        PurgedOut,
        RunStartedOut,
        BatchRunOut,
        CreditReviewsOut,
        SagasOut,
        SagaDetailOut,
        SagaActionOut,
        WebhookIn,
        WebhookSecretOut,
        WebhooksOut,
        DeliveriesOut,
        DeliveryReplayedOut,
        Problem,
    )
    schemas["WebhookIn"]["properties"]["url"]["pattern"] = url_pattern(settings.env)
    schemas["OrderIn"]["properties"]["lines"]["maxItems"] = settings.max_order_lines
    schemas["LineIn"]["properties"]["quantity"]["maximum"] = settings.max_line_quantity
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Order saga orchestrator",
            "version": "0.1.0",
            "description": "Every error is an RFC 9457 problem (application/problem+json). "
            "A method a path does not serve answers 405 with Allow. Operator endpoints "
            "(tag operators, security scheme operator) need an operator's key: a client's "
            "key gets 403.",
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (a client's or an operator's): "
                    "Authorization: Bearer <key>. A client key acts for its customers only.",
                },
                "operator": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An operator's API key: Authorization: Bearer <key>",
                },
            },
            "responses": {
                "MethodNotAllowed": {
                    "description": "The path does not serve this method (Allow: those it does)",
                    "headers": {"Allow": {"required": True, "schema": {"type": "string"}}},
                    "content": {PROBLEM_JSON: {"schema": _ref(Problem)}},
                }
            },
        },
        "security": [{"bearer": []}],
        "tags": [
            {
                "name": "operators",
                "description": "The dead-letter queue, batch runs, the credit check's findings "
                "and the sagas",
            }
        ],
        "paths": {
            **_order_paths(settings),
            **_customer_paths(),
            **_operator_paths(),
            **_webhook_paths(),
            **_open_paths(),
        },
    }
