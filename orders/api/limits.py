"""Rate limits per API key (Flask-Limiter, counting in Redis so every API process shares
one count).

The limit is checked in an app-level ``before_request``, before the blueprints
authenticate, so the caller is named without a database lookup: by the public id of the
key it presents (``key:<id>``, read from the token exactly as authentication reads it:
``auth.bearer_token``, ``keys.key_id_of``), or by its address when it sends no
well-formed key. One limit covers every route of a caller; the probes, ``/metrics`` and
``/openapi.json`` are exempt.

A made-up key is a new caller each time, so failed authentication has a budget of its
own: every 401 is a hit on the client's address (the same limit, storage and moving
window, counted with the ``limits`` library directly); once the address is over it, its
failures answer 429 instead of 401. Only failures count and only failures are refused: a
valid key from the same address (a NAT, a proxy) is never held back by someone else's
guessing.

Over a limit: 429 problem+json with ``Retry-After``. Every limited answer carries
``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds until the
window resets, as the IETF draft has it; Flask-Limiter's own headers give a timestamp).

The limiter's Redis unreachable: requests pass unlimited (fail open: orders keep
flowing), each counted in ``orders_api_rate_limit_unavailable_total`` and logged at most
once per ``UNAVAILABLE_LOG_SECONDS``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from flask import Flask, Response, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from limits import RateLimitItem, parse_many
from prometheus_client import Counter

from config.redis_client import is_sentinel, parse, sentinel_kwargs
from config.settings import Settings
from orders.api.auth import bearer_token
from orders.api.problems import problem
from orders.keys import key_id_of

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
#: The limit's scope for failed authentication, counted per address.
FAILED_AUTH_SCOPE = "failed-auth"

REFUSED = Counter("orders_api_rate_limited_total", "Requests refused by the rate limit (429).")
UNAVAILABLE = Counter(
    "orders_api_rate_limit_unavailable_total",
    "Requests let through unlimited because the rate limit's Redis could not be reached.",
)


def address() -> str:
    """The client's address (behind a proxy: the proxy's, unless it is made to pass it on)."""
    return f"addr:{request.remote_addr or 'unknown'}"


def caller() -> str:
    """Who the limit counts against: the public id of the key presented (what
    authentication looks up), else the address."""
    token = bearer_token()
    key_id = key_id_of(token) if token else None
    return f"key:{key_id}" if key_id else address()


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
        self.unavailable(record.exc_info[1])
        return False

    def unavailable(self, exc: BaseException | None) -> None:
        """Count a request let through unlimited; log it at most once per interval."""
        UNAVAILABLE.inc()
        with self._lock:
            now, due = time.monotonic(), self._last + UNAVAILABLE_LOG_SECONDS
            if now >= due:
                self._last = now
        if now >= due:
            logger.warning("rate limit storage unreachable, requests pass unlimited: %r", exc)


_FAIL_OPEN = _FailOpen()
#: Passed to redis.from_url (Flask-Limiter's annotation leaves out floats, which it takes).
_STORAGE_OPTIONS: dict[str, Any] = {
    "socket_timeout": STORAGE_TIMEOUT_SECONDS,
    "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
}


def _storage(url: str, settings: Settings) -> dict[str, Any]:
    """The limiter's storage: a redis:// URL as it is; a sentinel:// URL in the limits
    library's own form (``redis+sentinel://host:port,host:port/master``)."""
    if not is_sentinel(url):
        return {"storage_uri": url, "storage_options": _STORAGE_OPTIONS}
    target = parse(url)
    hosts = ",".join(f"{host}:{port}" for host, port in target.sentinels)
    return {
        "storage_uri": f"redis+sentinel://{hosts}/{settings.redis_sentinel_master}",
        "storage_options": {
            **_STORAGE_OPTIONS,
            "db": target.db,
            "username": target.username,
            "password": target.password,
            # The sentinels' own password (None: they ask for none), not the master's.
            "sentinel_kwargs": sentinel_kwargs(settings.sentinel, **_STORAGE_OPTIONS)
            | {"password": settings.redis_sentinel_password},
            # Counts are read where they are written: a replica may lag behind.
            "use_replicas": False,
        },
    }


def install_rate_limit(app: Flask, settings: Settings) -> Limiter | None:
    """Limit each caller to ``settings.rate_limit`` across the API (None: no limit)."""
    if not settings.rate_limit or not settings.rate_limit_storage_url:
        return None
    limiter = Limiter(
        caller,
        application_limits=[
            ApplicationLimit(settings.rate_limit, key_function=caller, scope="caller"),
        ],
        **_storage(settings.rate_limit_storage_url, settings),
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

    # Failed authentication, per address: the caller's limit, in the same storage and
    # moving window (refused when any of its items is over).
    failure_budget = parse_many(settings.rate_limit)

    @app.errorhandler(RateLimitExceeded)
    def too_many_requests(exc: RateLimitExceeded) -> Response:
        REFUSED.inc()
        return problem(429, "Too Many Requests", f"rate limit exceeded: {exc.description}")

    def failed_authentication(response: Response) -> Response:
        """Count a 401 against the client's address; past the budget, answer 429."""
        strategy, who = limiter.limiter, address()
        try:
            over = [
                item
                for item in failure_budget
                if not strategy.hit(item, KEY_PREFIX, FAILED_AUTH_SCOPE, who)
            ]
            if not over:
                return response
            limit: RateLimitItem = over[0]
            reset_at, _ = strategy.get_window_stats(limit, KEY_PREFIX, FAILED_AUTH_SCOPE, who)
        except Exception as exc:  # the storage is unreachable: the 401 stands
            _FAIL_OPEN.unavailable(exc)
            return response
        REFUSED.inc()
        refused = problem(
            429,
            "Too Many Requests",
            f"too many requests without a valid API key from this address: {limit}",
        )
        reset = max(0, math.ceil(reset_at - time.time()))
        refused.headers["RateLimit-Limit"] = str(limit.amount)
        refused.headers["RateLimit-Remaining"] = "0"
        refused.headers["RateLimit-Reset"] = str(reset)
        refused.headers["Retry-After"] = str(max(1, reset))
        return refused

    @app.after_request
    def rate_limit_headers(response: Response) -> Response:
        if response.status_code == 401:
            response = failed_authentication(response)
            if response.status_code == 429:
                return response
        current = limiter.current_limit
        if current is None:  # exempt, or the storage unreachable at the check
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
