"""The webhooks lane: beat sends ``webhooks.send_due`` every WEBHOOK_POLL_SECONDS; a run
takes the due deliveries (orders.webhook_deliveries) a few at a time and POSTs each,
signed (orders.webhooks), on a thread of its own, so one receiver that never answers
holds one thread for WEBHOOK_TIMEOUT_SECONDS, not the others. The lane has its own
worker (Procfile ``worker_webhooks``): no receiver, however slow, is ever in front of
a saga.

A 2xx answer delivers; anything else (another status, a refused connection, a timeout,
a redirect: redirects are not followed) is tried again after an exponential, capped,
jittered wait (workers.base.retry_delay), up to WEBHOOK_MAX_ATTEMPTS attempts; then the
delivery is DEAD and a dead letter (kind ``webhook_dead``) that replays it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
from celery import Celery
from prometheus_client import Counter as Metric
from sqlalchemy import Engine

from config import names
from config.settings import Settings
from orders import webhook_deliveries as deliveries
from orders import webhooks
from workers import dlq
from workers.base import policy, retry_delay
from workers.runtime import Runtime

logger = logging.getLogger(__name__)

#: Deliveries one run sends at the same time (a thread each).
PARALLEL = 16
#: A run takes no new delivery after this many seconds (beat starts the next).
RUN_SECONDS = 15.0
#: An attempt's lease beyond its timeouts: a sender that died leaves it due after this.
LEASE_MARGIN_SECONDS = 30.0
USER_AGENT = "order-saga-webhooks/0.1"

ATTEMPTS = Metric(
    "orders_webhook_attempts_total",
    "Webhook delivery attempts, by what became of the delivery (DELIVERED, PENDING, DEAD).",
    ["state"],
)

Resolver = Callable[[str], list[str]]


def resolve(host: str) -> list[str]:
    """The addresses ``host`` names."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, None)]


def attempt(
    client: httpx.Client, claimed: deliveries.Claimed, env: str, resolver: Resolver = resolve
) -> deliveries.Outcome:
    """POST one delivery, signed; what the receiver answered, or why nothing."""
    started = time.monotonic()

    def outcome(status: int | None, error: str | None) -> deliveries.Outcome:
        return deliveries.Outcome(status, error, int((time.monotonic() - started) * 1000))

    host = urlsplit(claimed.url).hostname or ""
    try:
        for address in resolver(host):
            refusal = webhooks.refused_address(ipaddress.ip_address(address.split("%")[0]), env)
            if refusal:
                return outcome(None, f"refused: {host} resolves to {refusal}")
    except (OSError, ValueError) as exc:
        return outcome(None, f"{host} does not resolve: {exc}")
    now = datetime.now(UTC)
    body = json.dumps(claimed.payload, separators=(",", ":"))
    signing = webhooks.signing_secrets(
        claimed.secret, claimed.previous_secret, claimed.previous_expires_at, now
    )
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **webhooks.signature_headers(claimed.event_id, body, signing, now),
    }
    try:
        # The status is all we need: the body is not read (nor waited for).
        with client.stream("POST", claimed.url, content=body.encode(), headers=headers) as answer:
            return outcome(answer.status_code, None)
    except httpx.TimeoutException as exc:
        return outcome(None, f"timed out: {type(exc).__name__}")
    except httpx.HTTPError as exc:
        return outcome(None, f"{type(exc).__name__}: {exc}")


def record(
    engine: Engine, settings: Settings, claimed: deliveries.Claimed, got: deliveries.Outcome
) -> str:
    """Record one attempt (and, for a delivery that died, its dead letter; for a replayed
    one delivered, its letter resolved) in one transaction; the delivery's new state."""
    letter = f"webhook:{claimed.id}"
    why = got.error or f"the receiver answered {got.status_code}"
    with engine.begin() as conn:
        state = deliveries.record_attempt(
            conn,
            claimed,
            got,
            max_attempts=settings.webhook_max_attempts,
            retry_in=retry_delay(
                claimed.attempts,
                base=settings.webhook_backoff_seconds,
                cap=settings.webhook_backoff_max_seconds,
            ),
        )
        if state == deliveries.DEAD:
            dlq.record_in(
                conn,
                task_id=letter,
                task_name=names.SEND_WEBHOOKS,
                kind=dlq.WEBHOOK_DEAD,
                error=f"{claimed.event_id} to {claimed.url}: {why}",
                args=[str(claimed.id)],
                queue=settings.webhooks_queue,
                attempts=claimed.attempts + 1,
            )
        elif state == deliveries.DELIVERED and claimed.replayed:
            dlq.resolve_in(conn, letter)
    ATTEMPTS.labels(state).inc()
    if state == deliveries.DEAD:
        logger.warning(
            "webhook %s: gave up after %d attempts: %s", claimed.event_id, claimed.attempts + 1, why
        )
    return state


def send_due(
    engine: Engine,
    settings: Settings,
    client: httpx.Client,
    resolver: Resolver = resolve,
    run_seconds: float = RUN_SECONDS,
) -> dict[str, int]:
    """Send due deliveries, PARALLEL at a time, for up to ``run_seconds``: a slot freed
    by an answered (or timed out) attempt takes the next due delivery. Returns how many
    deliveries ended in each state."""
    lease = timedelta(seconds=2 * settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS)
    deadline = time.monotonic() + run_seconds
    tally: Counter[str] = Counter()
    running: dict[Future[deliveries.Outcome], deliveries.Claimed] = {}
    with ThreadPoolExecutor(PARALLEL, thread_name_prefix="webhook") as pool:
        drained = False
        while True:
            free = PARALLEL - len(running)
            if free and not drained and time.monotonic() < deadline:
                claimed = deliveries.claim_due(engine, free, lease)
                drained = len(claimed) < free
                for item in claimed:
                    future = pool.submit(attempt, client, item, settings.env, resolver)
                    running[future] = item
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                item = running.pop(future)
                tally[record(engine, settings, item, future.result())] += 1
            # A freed slot: something may have come due since (a retry), look again.
            drained = False
    return dict(tally)


_clients: dict[int, httpx.Client] = {}


def http_client(settings: Settings) -> httpx.Client:
    """This process's HTTP client (a forked child builds its own): the settings'
    timeout to connect and again to read, no redirects, a pool per receiver."""
    pid = os.getpid()
    if pid not in _clients:
        timeout = settings.webhook_timeout_seconds
        _clients[pid] = httpx.Client(
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=PARALLEL, max_keepalive_connections=PARALLEL),
        )
    return _clients[pid]


def register_webhook_tasks(app: Celery, runtime: Runtime) -> None:
    """Register ``webhooks.send_due`` (beat sends it on the webhooks lane)."""
    base = policy(runtime)

    # Sent every second or so, like the housekeeping tasks: no task events (Flower's task
    # list is for the sagas) and no routine log lines (config.logs.QUIET_TASKS).
    @app.task(
        shared=False,
        name=names.SEND_WEBHOOKS,
        base=base,
        retries=0,
        dead_letters=False,
        send_events=False,
    )
    def send_webhooks() -> dict[str, int]:
        """Send the deliveries that are due."""
        settings = runtime.settings
        return send_due(runtime.engine, settings, http_client(settings))
