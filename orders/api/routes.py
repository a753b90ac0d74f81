"""The orders endpoints: accept an order, read it, read its status."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from flask import Blueprint, Response, g, request
from sqlalchemy import Engine
from werkzeug.exceptions import BadRequest, NotFound, RequestEntityTooLarge, UnsupportedMediaType

from config.settings import Settings
from orders import queries, services
from orders.api.auth import require_api_key
from orders.api.schemas import AcceptedOut, LineOut, Links, OrderIn, OrderOut, StatusOut
from orders.domain import OrderLine, OrderStatus, PlaceOrder
from orders.errors import InvalidOrderError
from orders.ports import SagaStarter

#: Idempotency-Key values: 1 to 255 visible ASCII characters (quotes of an sf-string dropped).
MAX_IDEMPOTENCY_KEY = 255


def orders_blueprint(settings: Settings, engine: Engine, starter: SagaStarter) -> Blueprint:
    """The ``/orders`` endpoints, bound to this app's engine and saga starter."""
    bp = Blueprint("orders", __name__, url_prefix="/orders")

    @bp.before_request
    def authenticate() -> None:
        require_api_key(settings.api_keys)

    @bp.post("")
    def place_order() -> Response:
        key = _idempotency_key()
        body = OrderIn.model_validate(_json_body(settings.max_body_bytes))
        _check_limits(body, settings)
        cmd = PlaceOrder(
            customer_id=body.customer_id,
            lines=tuple(OrderLine(line.product_id, line.quantity) for line in body.lines),
            client=g.client,
            idempotency_key=key,
        )
        accepted = services.place_order(engine, cmd, starter)
        status = OrderStatus.PENDING.value
        if accepted.replayed:
            current = queries.get_status(engine, accepted.order_id)
            status = current.status if current else status
        links = Links(
            self=f"/orders/{accepted.order_id}", status=f"/orders/{accepted.order_id}/status"
        )
        out = AcceptedOut(order_id=accepted.order_id, status=status, links=links)
        response = _json(out.model_dump(mode="json"), 202)
        response.headers["Location"] = links.status
        return response

    @bp.get("/<order_id>")
    def get_order(order_id: str) -> Response:
        view = queries.get_order(engine, _uuid(order_id))
        if view is None:
            raise NotFound(f"no order {order_id}")
        out = OrderOut(
            order_id=view.order_id,
            customer_id=view.customer_id,
            status=view.status,
            cancel_reason=view.cancel_reason,
            problem=view.problem,
            total=str(view.total),
            lines=[
                LineOut(
                    product_id=ln.product_id, quantity=ln.quantity, unit_price=str(ln.unit_price)
                )
                for ln in view.lines
            ],
            created_at=view.created_at,
            updated_at=view.updated_at,
        )
        return _json(out.model_dump(mode="json"))

    @bp.get("/<order_id>/status")
    def get_status(order_id: str) -> Response:
        view = queries.get_status(engine, _uuid(order_id))
        if view is None:
            raise NotFound(f"no order {order_id}")
        out = StatusOut(
            order_id=view.order_id,
            status=view.status,
            cancel_reason=view.cancel_reason,
            updated_at=view.updated_at,
        )
        return _json(out.model_dump(mode="json"))

    return bp


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _json_body(max_bytes: int) -> Any:
    """The request's JSON document; 415 for another media type, 413 past ``max_bytes``,
    400 when malformed."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send the order as application/json")
    # Flask reads at most MAX_CONTENT_LENGTH = max_bytes + 1 bytes; a chunked body (no
    # Content-Length) is cut there silently, so one byte more than allowed means too large.
    raw = request.get_data(cache=False)
    if len(raw) > max_bytes:
        raise RequestEntityTooLarge()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON: {type(exc).__name__}") from None


def _check_limits(body: OrderIn, settings: Settings) -> None:
    """Rules the schema cannot carry: configured limits and distinct products."""
    errors: list[dict[str, Any]] = []
    if len(body.lines) > settings.max_order_lines:
        errors.append({"loc": "lines", "msg": f"at most {settings.max_order_lines} lines"})
    seen: set[str] = set()
    for n, line in enumerate(body.lines):
        if line.quantity > settings.max_line_quantity:
            errors.append(
                {"loc": f"lines.{n}.quantity", "msg": f"at most {settings.max_line_quantity}"}
            )
        if line.product_id in seen:
            errors.append({"loc": f"lines.{n}.product_id", "msg": "product listed twice"})
        seen.add(line.product_id)
    if errors:
        raise InvalidOrderError("the order breaks the limits of this service", errors)


def _idempotency_key() -> str | None:
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not all(33 <= ord(ch) < 127 for ch in key):
        raise BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return key


def _uuid(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise NotFound(f"no order {text}") from None
