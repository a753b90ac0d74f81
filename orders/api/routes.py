"""The orders endpoints (accept an order, read it, read statuses, cancel it, refund it)
and the customers' read side (their orders, summary and credit)."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID

from flask import Blueprint, Response, g, request
from sqlalchemy import Engine
from werkzeug.exceptions import (
    BadRequest,
    Conflict,
    HTTPException,
    NotFound,
)

from config.settings import Settings
from orders import lifecycle, queries, services
from orders.api.auth import may_see, require_customer, require_key
from orders.api.bodies import read_json
from orders.api.schemas import (
    REF_PATTERN,
    AcceptedOut,
    ActionOut,
    CreditOut,
    CustomerOrdersOut,
    CustomerSummaryOut,
    LineOut,
    Links,
    OrderIn,
    OrderOut,
    StatusesOut,
    StatusOut,
)
from orders.domain import ActOnOrder, OrderAction, OrderLine, OrderStatus, PlaceOrder
from orders.errors import InvalidOrderError, InvalidTransitionError
from orders.ports import SagaCanceller, SagaStarter
from orders.queries import OrderView, StatusView
from orders.reads import Reader

#: Idempotency-Key values: 1 to 255 visible ASCII characters (quotes of an sf-string dropped).
MAX_IDEMPOTENCY_KEY = 255
#: Most ids one status lookup takes.
MAX_STATUS_IDS = 100
#: Orders per page of a customer's orders: by default, and at most.
PAGE_SIZE, MAX_PAGE_SIZE = 20, 100


#: A customer id in a path: what a Ref may be (anything else names no customer).
_REF = re.compile(REF_PATTERN)


def orders_blueprint(
    settings: Settings,
    engine: Engine,
    starter: SagaStarter,
    reader: Reader,
    *,
    canceller: SagaCanceller | None = None,
    refunds: SagaStarter | None = None,
) -> Blueprint:
    """The ``/orders`` endpoints, bound to this app's engine, saga starter and reader;
    with ``canceller`` and ``refunds``, also cancel and refund."""
    bp = Blueprint("orders", __name__, url_prefix="/orders")

    @bp.before_request
    def authenticate() -> None:
        require_key(engine)

    @bp.post("")
    def place_order() -> Response:
        key = _idempotency_key()
        body = OrderIn.model_validate(read_json(settings.max_body_bytes))
        _check_limits(body, settings)
        # A customer outside the key's scope is not there, as far as this key can tell:
        # 404 before anything is read or written.
        require_customer(body.customer_id)
        cmd = PlaceOrder(
            customer_id=body.customer_id,
            lines=tuple(OrderLine(line.product_id, line.quantity) for line in body.lines),
            client=g.client,
            idempotency_key=key,
        )
        precheck = reader.credit_shortfall if settings.credit_precheck else None
        accepted = services.place_order(engine, cmd, starter, precheck)
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

    @bp.get("/status")
    def get_statuses() -> Response:
        raw = [part.strip() for part in request.args.get("ids", "").split(",") if part.strip()]
        if not 0 < len(raw) <= MAX_STATUS_IDS:
            raise BadRequest(f"ids: 1 to {MAX_STATUS_IDS} order ids, separated by commas")
        ids = list(dict.fromkeys(_uuid(text, BadRequest) for text in raw))
        found = {i: v for i, v in reader.statuses(ids).items() if may_see(v.customer_id)}
        out = StatusesOut(
            statuses=[_status_out(found[i]) for i in ids if i in found],
            unknown=[str(i) for i in ids if i not in found],
        )
        return _json(out.model_dump(mode="json"))

    @bp.get("/<order_id>")
    def get_order(order_id: str) -> Response:
        view = reader.order(_uuid(order_id))
        if view is None or not may_see(view.customer_id):
            raise NotFound(f"no order {order_id}")
        return _json(_order_out(view).model_dump(mode="json"))

    @bp.get("/<order_id>/status")
    def get_status(order_id: str) -> Response:
        view = reader.status(_uuid(order_id))
        if view is None or not may_see(view.customer_id):
            raise NotFound(f"no order {order_id}")
        return _json(_status_out(view).model_dump(mode="json"))

    if canceller is None or refunds is None:
        return bp

    def act(order_id: str, action: OrderAction) -> Response:
        key = _idempotency_key()
        wanted = _uuid(order_id)
        # An order outside the key's customers is not there, as far as this key can tell.
        view = reader.status(wanted)
        if view is None or not may_see(view.customer_id):
            raise NotFound(f"no order {order_id}")
        cmd = ActOnOrder(wanted, action, client=g.client, idempotency_key=key)
        try:
            if action is OrderAction.CANCEL:
                taken = lifecycle.cancel_order(engine, cmd, canceller, refunds)
            else:
                taken = lifecycle.refund_order(engine, cmd, refunds)
        except InvalidTransitionError as exc:
            raise Conflict(str(exc)) from None
        links = Links(self=f"/orders/{wanted}", status=f"/orders/{wanted}/status")
        out = ActionOut(
            order_id=wanted,
            outcome=taken.outcome,
            refund_saga_id=taken.refund_saga_id,
            links=links,
        )
        response = _json(out.model_dump(mode="json"), 202)
        response.headers["Location"] = links.status
        return response

    @bp.post("/<order_id>/cancel")
    def cancel_order(order_id: str) -> Response:
        return act(order_id, OrderAction.CANCEL)

    @bp.post("/<order_id>/refund")
    def refund_order(order_id: str) -> Response:
        return act(order_id, OrderAction.REFUND)

    return bp


def customers_blueprint(settings: Settings, engine: Engine, reader: Reader) -> Blueprint:
    """``/customers/<id>/...``: a customer's orders, order summary and credit."""
    bp = Blueprint("customers", __name__, url_prefix="/customers")

    @bp.before_request
    def authenticate() -> None:
        require_key(engine)
        customer_id = (request.view_args or {}).get("customer_id", "")
        if not _REF.fullmatch(customer_id):
            raise NotFound(f"no customer {customer_id!r}")
        require_customer(customer_id)

    @bp.get("/<customer_id>/orders")
    def customer_orders(customer_id: str) -> Response:
        try:
            limit = int(request.args.get("limit", PAGE_SIZE))
        except ValueError:
            raise BadRequest("limit is a number") from None
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise BadRequest(f"limit is between 1 and {MAX_PAGE_SIZE}")
        after = _cursor(request.args.get("after"))
        page = queries.customer_orders(engine, customer_id, limit, after)
        if page is None:
            raise NotFound(f"no customer {customer_id}")
        following = None
        if page.next_after is not None:
            created, order_id = page.next_after
            cursor = base64.urlsafe_b64encode(f"{created.isoformat()}|{order_id}".encode())
            following = (
                f"/customers/{quote(customer_id, safe='')}/orders?limit={limit}"
                f"&after={cursor.decode()}"
            )
        out = CustomerOrdersOut(orders=[_order_out(v) for v in page.orders], next=following)
        return _json(out.model_dump(mode="json"))

    @bp.get("/<customer_id>/summary")
    def customer_summary(customer_id: str) -> Response:
        summary = queries.customer_summary(engine, customer_id)
        if summary is None:
            raise NotFound(f"no customer {customer_id}")
        out = CustomerSummaryOut(
            customer_id=summary.customer_id,
            orders_placed=summary.orders_placed,
            orders_confirmed=summary.orders_confirmed,
            orders_cancelled=summary.orders_cancelled,
            placed_total=f"{summary.placed_total:.2f}",
            confirmed_total=f"{summary.confirmed_total:.2f}",
            last_order_at=summary.last_order_at,
            orders_refunded=summary.orders_refunded,
            refunded_total=f"{summary.refunded_total:.2f}",
        )
        return _json(out.model_dump(mode="json"))

    @bp.get("/<customer_id>/credit")
    def customer_credit(customer_id: str) -> Response:
        figures = reader.credit(customer_id)
        if figures is None:
            raise NotFound(f"no customer {customer_id}")
        out = CreditOut(
            customer_id=figures.customer_id,
            limit=f"{figures.limit:.2f}",
            used=f"{figures.used:.2f}",
            reserved=f"{figures.reserved:.2f}",
            available=f"{figures.available:.2f}",
        )
        return _json(out.model_dump(mode="json"))

    return bp


def _status_out(view: StatusView) -> StatusOut:
    return StatusOut(
        order_id=view.order_id,
        status=view.status,
        cancel_reason=view.cancel_reason,
        updated_at=view.updated_at,
    )


def _order_out(view: OrderView) -> OrderOut:
    return OrderOut(
        order_id=view.order_id,
        customer_id=view.customer_id,
        status=view.status,
        cancel_reason=view.cancel_reason,
        problem=view.problem,
        total=str(view.total),
        lines=[
            LineOut(product_id=ln.product_id, quantity=ln.quantity, unit_price=str(ln.unit_price))
            for ln in view.lines
        ],
        created_at=view.created_at,
        updated_at=view.updated_at,
    )


def _cursor(raw: str | None) -> tuple[datetime, UUID] | None:
    if raw is None:
        return None
    try:
        created, _, order_id = base64.urlsafe_b64decode(raw.encode()).decode().partition("|")
        return datetime.fromisoformat(created), UUID(order_id)
    except ValueError:
        raise BadRequest("after: the cursor of a previous page's next link") from None


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


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


def _uuid(text: str, error: type[HTTPException] = NotFound) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise error(f"no order {text}") from None
