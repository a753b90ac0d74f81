"""Bearer API keys: every order endpoint needs one of the configured keys."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from flask import g, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized


def client_id(api_key: str) -> str:
    """A stable, non-secret name for the holder of a key (scopes idempotency keys)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def require_api_key(keys: Iterable[str]) -> None:
    """Abort with 401 unless the request carries one of ``keys``; set ``g.client``."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    # Compare against every key in constant time, so timing tells nothing.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    if scheme.lower() != "bearer" or not token or not matched:
        raise Unauthorized(
            "a valid API key is required: Authorization: Bearer <key>",
            # Sent with every 401, as RFC 6750 asks.
            www_authenticate=WWWAuthenticate("Bearer", {"realm": "orders"}),
        )
    g.client = client_id(token)
