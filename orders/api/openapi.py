"""The OpenAPI 3.1 document, built from the pydantic models the endpoints validate with."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from orders.api.schemas import (
    AcceptedOut,
    CreditOut,
    CustomerOrdersOut,
    CustomerSummaryOut,
    OrderIn,
    OrderOut,
    Problem,
    StatusesOut,
    StatusOut,
)

_REF = "#/components/schemas/{model}"


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
    reasons = {
        400: "Malformed request (JSON, header)",
        401: "Missing or wrong API key",
        404: "No such order",
        413: "Body too large",
        415: "Body is not application/json",
        422: "Invalid order (schema, unknown customer or product, limits, reused key)",
    }
    return {
        str(code): {
            "description": reasons[code],
            "content": {"application/problem+json": {"schema": _ref(Problem)}},
        }
        for code in codes
    }


def _read(model: type[BaseModel], summary: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": [
                {
                    "name": "order_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "format": "uuid"},
                }
            ],
            "responses": {
                "200": {
                    "description": summary,
                    "content": {"application/json": {"schema": _ref(model)}},
                },
                **_problems(401, 404),
            },
        }
    }


def _param(name: str, where: str, text: str, kind: str = "string") -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path" or name == "ids",
        "description": text,
        "schema": {"type": kind},
    }


def _query(
    model: type[BaseModel], summary: str, parameters: list[dict[str, Any]], *codes: int
) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": parameters,
            "responses": {
                "200": {
                    "description": summary,
                    "content": {"application/json": {"schema": _ref(model)}},
                },
                **_problems(401, *codes),
            },
        }
    }


def _page(summary: str, media: str) -> dict[str, Any]:
    read = _read(OrderOut, summary)
    read["get"]["responses"]["200"] = {"description": summary, "content": {media: {}}}
    return read


def openapi_document() -> dict[str, Any]:
    """The API described for clients and contract tests."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "Order saga orchestrator", "version": "0.1.0"},
        "components": {
            "schemas": _components(
                OrderIn,
                AcceptedOut,
                OrderOut,
                StatusOut,
                StatusesOut,
                CustomerOrdersOut,
                CustomerSummaryOut,
                CreditOut,
                Problem,
            ),
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"apiKey": []}],
        "paths": {
            "/orders": {
                "post": {
                    "summary": "Accept an order and start its saga",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                            "description": "A retried POST with the same key returns the same "
                            "order; the same key with another body is refused (422).",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref(OrderIn)}},
                    },
                    "responses": {
                        "202": {
                            "description": "Accepted; the saga runs. Location: the status URL.",
                            "headers": {"Location": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": _ref(AcceptedOut)}},
                        },
                        **_problems(400, 401, 413, 415, 422),
                    },
                }
            },
            "/orders/status": _query(
                StatusesOut,
                "Up to 100 orders' statuses (one cache lookup, one query for the misses)",
                [_param("ids", "query", "order ids separated by commas (1 to 100)")],
                400,
            ),
            "/orders/{order_id}": _read(OrderOut, "The order with its lines"),
            "/orders/{order_id}/status": _read(StatusOut, "The order's status"),
            "/orders/{order_id}/timeline": _page(
                "The saga's steps with start and end times, outcome and attempts",
                "application/json",
            ),
            "/orders/{order_id}/timeline.html": _page(
                "The saga drawn as bars on a time axis", "text/html"
            ),
            "/customers/{customer_id}/orders": _query(
                CustomerOrdersOut,
                "The customer's orders with their lines, newest first, a page at a time",
                [
                    _param("customer_id", "path", "the customer"),
                    _param("limit", "query", "orders per page, 1 to 100 (20)", "integer"),
                    _param("after", "query", "the cursor of the previous page's next link"),
                ],
                400,
                404,
            ),
            "/customers/{customer_id}/summary": _query(
                CustomerSummaryOut,
                "The customer's orders at a glance (kept from the order events)",
                [_param("customer_id", "path", "the customer")],
                404,
            ),
            "/customers/{customer_id}/credit": _query(
                CreditOut,
                "The customer's credit: limit, used, reserved, available (cached)",
                [_param("customer_id", "path", "the customer")],
                404,
            ),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {"200": {"description": "Metrics"}},
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {"200": {"description": "The process runs"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: database and Redis reachable",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": {"description": "Not ready"},
                    },
                }
            },
        },
    }
