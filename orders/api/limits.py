"""Rate limits per API key (Flask-Limiter, counting in Redis so every API process shares
one count).

The limit is checked in an app-level ``before_request``, before the blueprints
authenticate, so the caller is named without a database lookup: by a hash of its bearer
token (never the token itself in Redis), or by its address when it sends none. One limit
covers every route of a caller; the probes, ``/metrics`` and ``/openapi.json`` are exempt.
Answers 401 also count against the client's address, under the same limit: a made-up
token per request is a new key each time, but not a new address.

Over the limit: 429 problem+json with ``Retry-After``. Every limited answer carries
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds until the
window resets, as the IETF draft has it; Flask-Limiter's own headers give a timestamp).

The limiter's Redis unreachable: requests pass unlimited (fail open: orders keep
flowing), each counted in ``orders_api_rate_limit_unavailable_total`` and logged at most
once per ``UNAVAILABLE_LOG_SECONDS``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from typing import Any

from flask import Flask, Response, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from prometheus_client import Counter

from config.settings import Settings
from orders.api.problems import problem

logger = logging.getLogger(__name__)

#: Paths no caller is limited on: probes, scrapes and the API's description.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
#: Seconds the limiter waits for its Redis before letting a request through.
STORAGE_TIMEOUT_SECONDS = 0.1
#: At most one log line per this many seconds while the limiter's Redis is unreachable.
UNAVAILABLE_LOG_SECONDS = 10.0
#: How the limiter counts: a moving window, exact (never more than the limit in any
#: window, no double burst at a window's edge), one timestamp per request kept per key.
STRATEGY = "moving-window"
#: Prefix of the limiter's keys in Redis.
KEY_PREFIX = "orders-ratelimit"

REFUSED = Counter("orders_api_rate_limited_total", "Requests refused by the rate limit (429).")
UNAVAILABLE = Counter(
    "orders_api_rate_limit_unavailable_total",
    "Requests let through unlimited because the rate limit's Redis could not be reached.",
)


def address() -> str:
    """The client's address (behind a proxy: the proxy's, unless it is made to pass it on)."""
    return f"addr:{request.remote_addr or 'unknown'}"


def caller() -> str:
    """Who the limit counts against: a hash of the bearer token, else the address."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return "key:" + hashlib.sha256(token.strip().encode()).hexdigest()[:16]
    return address()


def _refused_key(response: Response) -> bool:
    return response.status_code == 401


class _FailOpen(logging.Filter):
    """Turns Flask-Limiter's "Swallowing error" tracebacks (one per request while its
    Redis is down) into a count and an occasional line."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._last = -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        UNAVAILABLE.inc()
        with self._lock:
            now, due = time.monotonic(), self._last + UNAVAILABLE_LOG_SECONDS
            if now >= due:
                self._last = now
        if now >= due:
            logger.warning(
                "rate limit storage unreachable, requests pass unlimited: %r",
                record.exc_info[1],
            )
        return False


_FAIL_OPEN = _FailOpen()
#: Passed to redis.from_url (Flask-Limiter's annotation leaves out floats, which it takes).
_STORAGE_OPTIONS: dict[str, Any] = {
    "socket_timeout": STORAGE_TIMEOUT_SECONDS,
    "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
}


def install_rate_limit(app: Flask, settings: Settings) -> Limiter | None:
    """Limit each caller to ``settings.rate_limit`` across the API (None: no limit)."""
    if not settings.rate_limit or not settings.rate_limit_storage_url:
        return None
    limiter = Limiter(
        caller,
        application_limits=[
            ApplicationLimit(settings.rate_limit, key_function=caller, scope="caller"),
            # A made-up token each time is a new caller: the answers 401 count against
            # the address too, so guessing keys is limited as well.
            ApplicationLimit(
                settings.rate_limit,
                key_function=address,
                scope="unauthorized",
                deduct_when=_refused_key,
            ),
        ],
        storage_uri=settings.rate_limit_storage_url,
        storage_options=_STORAGE_OPTIONS,
        strategy=STRATEGY,
        key_prefix=KEY_PREFIX,
        headers_enabled=False,  # written below, with the IETF names and semantics
        swallow_errors=True,
    )
    library_log = logging.getLogger("flask-limiter")
    # A refusal is counted (orders_api_rate_limited_total), not logged: a flood of them
    # would flood the log (the library logs each at INFO).
    library_log.setLevel(logging.WARNING)
    if _FAIL_OPEN not in library_log.filters:
        library_log.addFilter(_FAIL_OPEN)
    limiter.request_filter(lambda: request.path in EXEMPT_PATHS)
    limiter.init_app(app)

    @app.errorhandler(RateLimitExceeded)
    def too_many_requests(exc: RateLimitExceeded) -> Response:
        REFUSED.inc()
        return problem(429, "Too Many Requests", f"rate limit exceeded: {exc.description}")

    @app.after_request
    def rate_limit_headers(response: Response) -> Response:
        current = limiter.current_limit
        if current is None:
            return response
        try:
            reset_at, remaining = current.window
        except Exception:  # the storage went away since the check: no headers
            return response
        reset = max(0, math.ceil(reset_at - time.time()))
        response.headers["RateLimit-Limit"] = str(current.limit.amount)
        response.headers["RateLimit-Remaining"] = str(max(0, remaining))
        response.headers["RateLimit-Reset"] = str(reset)
        if response.status_code == 429:
            response.headers["Retry-After"] = str(max(1, reset))
        return response

    return limiter
