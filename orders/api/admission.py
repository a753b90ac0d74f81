"""Admission control: ``POST /orders`` answers 503 at once while the saga lane's backlog
is past what its workers clear in time, instead of accepting orders that would wait.

The backlog is the number of messages waiting in the saga lane's queue on the broker
(kombu's Redis transport keeps one list per priority step: the same count as
``workers.liveness.depth``), read in one pipelined call and kept for ``CACHE_SECONDS`` in
the process, so a flood costs a few Redis calls a second. The check runs in an app-level
``before_request``, before PostgreSQL, so a refused order writes nothing. A request
without a well-formed bearer key is not checked: authentication answers it 401, and no
one without a key learns of the backlog. The broker unreachable: orders are admitted
(their outbox entries carry them), and the failure is logged at most once per
``UNAVAILABLE_LOG_SECONDS``.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask, Response, request
from kombu.transport.redis import Channel
from prometheus_client import Counter
from redis import Redis

from config.redis_client import connect
from config.settings import Settings
from orders.api.auth import bearer_token
from orders.api.problems import problem
from orders.keys import key_id_of

logger = logging.getLogger(__name__)

#: Seconds one reading of the backlog is trusted (per process).
CACHE_SECONDS = 0.2
#: Seconds a refused client is told to wait: several readings later.
RETRY_AFTER_SECONDS = 2
#: Seconds the check waits for the broker before admitting the order.
BROKER_TIMEOUT_SECONDS = 0.1
#: At most one log line per this many seconds while the broker cannot be read.
UNAVAILABLE_LOG_SECONDS = 10.0
#: The endpoint admission guards.
GUARDED_ENDPOINT = "orders.place_order"

REFUSED = Counter(
    "orders_api_admission_refused_total",
    "Orders refused (503) because the saga lane's backlog was past its bound.",
)


def lane_keys(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s messages, one per priority step."""
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in Channel.priority_steps]


class Backlog:
    """The saga lane's backlog, read at most once per ``CACHE_SECONDS``."""

    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.keys = lane_keys(queue)
        self._lock = threading.Lock()
        self._read_at = -CACHE_SECONDS
        self._value: int | None = None
        self._logged_at = -UNAVAILABLE_LOG_SECONDS

    def current(self) -> int | None:
        """Messages waiting in the lane, or None when the broker cannot be read."""
        with self._lock:  # one reader at a time; the others take its answer
            now = time.monotonic()
            if now - self._read_at < CACHE_SECONDS:
                return self._value
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for key in self.keys:
                        pipe.llen(key)
                    self._value = sum(int(n) for n in pipe.execute())
            except Exception as exc:  # admit: the outbox carries what the broker cannot
                self._value = None
                if now - self._logged_at >= UNAVAILABLE_LOG_SECONDS:
                    self._logged_at = now
                    logger.warning("saga lane backlog unknown, orders admitted: %r", exc)
            self._read_at = now
            return self._value


def install_admission(app: Flask, settings: Settings) -> Backlog | None:
    """Refuse new orders while the saga lane holds more than
    ``settings.admission_max_backlog`` messages (None: no admission control)."""
    bound = settings.admission_max_backlog
    if bound <= 0:
        return None
    redis = connect(
        settings.broker_url,
        settings.sentinel,
        socket_timeout=BROKER_TIMEOUT_SECONDS,
        socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
    )
    backlog = Backlog(redis, settings.saga_queue)

    @app.before_request
    def admit() -> Response | None:
        if request.endpoint != GUARDED_ENDPOINT or request.method != "POST":
            return None
        token = bearer_token()
        if token is None or key_id_of(token) is None:
            return None  # 401 from authentication, not a word about the backlog
        waiting = backlog.current()
        if waiting is None or waiting <= bound:
            return None
        REFUSED.inc()
        response = problem(
            503,
            "Service Unavailable",
            "too many orders are waiting for the saga workers; retry later",
        )
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    return backlog
