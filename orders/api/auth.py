"""Bearer API keys (orders.keys): every endpoint but health, metrics and the document
needs one; the operators' endpoints need an operator's."""

from __future__ import annotations

from flask import g, request
from sqlalchemy import Engine
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, NotFound, Unauthorized

from orders import keys
from orders.keys import Principal

#: Longest Authorization header value looked at (a key is 64 characters).
MAX_CREDENTIALS = 200


def bearer_token() -> str | None:
    """The request's bearer token, or None: no such header, another scheme, or a header
    longer than ``MAX_CREDENTIALS`` (refused whole, never cut)."""
    header = request.headers.get("Authorization", "")
    if len(header) > MAX_CREDENTIALS:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def require_key(engine: Engine, *, operator: bool = False) -> Principal:
    """The caller's principal (also ``g.principal``; ``g.client`` is its key id, the
    scope of its idempotency keys). 401 without a valid key; 403 when ``operator`` and
    the key is a client's."""
    token = bearer_token()
    principal = keys.authenticate(engine, token) if token else None
    if principal is None:
        raise Unauthorized(
            "a valid API key is required: Authorization: Bearer <key>",
            # Sent with every 401, as RFC 6750 asks.
            www_authenticate=WWWAuthenticate("Bearer", {"realm": "orders"}),
        )
    # An operator's key spans every customer (the table says so too); a scoped one
    # would reach every customer's dead letters and batch runs here.
    if operator and not (principal.is_operator and principal.customers is None):
        raise Forbidden("this endpoint needs an operator's key")
    g.principal = principal
    g.client = principal.key_id
    return principal


def require_customer(customer_id: str) -> None:
    """404, as if it did not exist, when the caller's key may not act for
    ``customer_id`` (nothing tells a customer outside the scope exists)."""
    principal: Principal = g.principal
    if not principal.may_act_for(customer_id):
        raise NotFound(f"no customer {customer_id}")


def may_see(customer_id: str) -> bool:
    """Whether the caller's key may read what belongs to ``customer_id``."""
    principal: Principal = g.principal
    return principal.may_act_for(customer_id)
