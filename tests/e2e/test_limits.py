"""Rate limits per key and admission control, through gunicorn (2 processes), Redis and
a Celery worker.

Each stack here runs on Redis servers of its own, so its limits, its stopped lane and
its stopped limiter Redis never touch the session's stack. Each test counts against keys
and a loopback address of its own and compares counters before and after, so no test
depends on another having run or not."""

from __future__ import annotations

import http.client
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from uuid import uuid4

import httpx
import psutil
import pytest
from sqlalchemy import Engine, func, select

from config.settings import Settings
from orders import keys
from orders.api.auth import MAX_CREDENTIALS
from orders.tables import orders
from scripts.services import LocalRedis
from tests.conftest import API_KEY, Servers
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product, wait_for

pytestmark = pytest.mark.e2e

#: Requests per key and minute on the rate-limited stack.
LIMIT = 12
#: Messages the saga lane may hold before orders are refused.
MAX_BACKLOG = 6
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _new_key(owner_engine: Engine) -> str:
    """A client key for every customer, with a rate limit count of its own (keys are the
    schema owner's to make)."""
    with owner_engine.begin() as conn:
        return keys.create(conn, f"tests: limits {uuid4().hex[:8]}")[1]


def _from(address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (any of 127.0.0.0/8 is this host),
    so its requests count against an address no other test uses."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


@dataclass
class Limited:
    """A stack whose rate limit counts in a Redis the test may stop."""

    stack: Stack
    limiter_redis: LocalRedis


def _redis(servers: Servers, name: str) -> LocalRedis:
    redis = LocalRedis(servers.base / "e2e-limits", password=secrets.token_hex(12), name=name)
    redis.start()
    return redis


@pytest.fixture(scope="module")
def limited(settings: Settings, servers: Servers) -> Iterator[Limited]:
    broker, limiter = _redis(servers, "broker-limited"), _redis(servers, "limiter")
    own = replace(settings, broker_url=broker.url(0), result_backend_url=broker.url(1))
    stack = Stack(
        own,
        servers.base / "e2e-limited",
        extra_env={"RATE_LIMIT": f"{LIMIT}/minute", "RATE_LIMIT_STORAGE_URL": limiter.url(0)},
    )
    try:
        stack.start()
        yield Limited(stack, limiter)
    finally:
        stack.stop()
        limiter.stop()
        broker.stop()


@pytest.fixture(scope="module")
def admitting(settings: Settings, servers: Servers) -> Iterator[Stack]:
    broker = _redis(servers, "broker-admitting")
    own = replace(settings, broker_url=broker.url(0), result_backend_url=broker.url(1))
    stack = Stack(
        own,
        servers.base / "e2e-admitting",
        extra_env={"ADMISSION_MAX_BACKLOG": str(MAX_BACKLOG), "RATE_LIMIT": ""},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        broker.stop()


def _serving_pid(stack: Stack, client_port: int) -> int | None:
    """Which gunicorn worker holds the connection from ``client_port``."""
    for pid in stack.service("web").children():
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.raddr and c.raddr.port == client_port for c in connections):
            return pid
    return None


def _get_on_a_new_connection(
    stack: Stack, path: str, headers: dict[str, str] = AUTH
) -> tuple[http.client.HTTPResponse, bytes, int | None]:
    conn = http.client.HTTPConnection("127.0.0.1", stack.api_port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        assert conn.sock is not None
        pid = _serving_pid(stack, conn.sock.getsockname()[1])  # still open: keep-alive
        return response, body, pid
    finally:
        conn.close()


def _metric(stack: Stack, name: str) -> float:
    text = httpx.get(f"{stack.api_url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@contextmanager
def _paused(pid: int) -> Iterator[None]:
    """Stop one gunicorn worker (SIGSTOP) for a moment: it accepts no connection, so the
    other worker takes every new one, whatever the kernel would prefer. Well inside the
    worker timeout (30 s), so gunicorn leaves it be."""
    process = psutil.Process(pid)
    process.suspend()
    try:
        yield
    finally:
        process.resume()


def test_a_key_over_its_limit_gets_429_with_the_rate_limit_headers_across_every_process(
    limited: Limited, owner_engine: Engine
) -> None:
    stack = limited.stack
    key = _new_key(owner_engine)
    workers = sorted(stack.service("web").children())
    assert len(workers) == 2
    refused_before = _metric(stack, "orders_api_rate_limited_total")
    # Half the requests while only the first worker accepts, half while only the second
    # does: both answer, however the kernel would have spread the connections.
    each = (LIMIT + 8) // 2
    answers: list[tuple[http.client.HTTPResponse, bytes]] = []
    for serving, other in (workers, workers[::-1]):
        with _paused(other):
            for _ in range(each):
                response, body, pid = _get_on_a_new_connection(
                    stack, f"/orders/{uuid4()}/status", _bearer(key)
                )
                assert pid == serving
                answers.append((response, body))

    served = [(r, body) for r, body in answers if r.status != 429]
    refused = [(r, body) for r, body in answers if r.status == 429]
    # One count for both processes: the second served only what the first left over.
    assert [r.status for r, _ in answers] == [404] * LIMIT + [429] * (2 * each - LIMIT)
    assert len(served) == LIMIT < 2 * each
    response, body = refused[0]
    assert response.getheader("Content-Type") == "application/problem+json"
    assert b'"status": 429' in body or b'"status":429' in body
    assert int(response.getheader("Retry-After") or "0") >= 1
    assert response.getheader("RateLimit-Limit") == str(LIMIT)
    assert response.getheader("RateLimit-Remaining") == "0"
    assert 0 <= int(response.getheader("RateLimit-Reset") or "-1") <= 60
    first, _ = served[0]
    assert first.getheader("RateLimit-Limit") == str(LIMIT)
    assert int(first.getheader("RateLimit-Remaining") or "-1") == LIMIT - 1

    # The count is the key's, however its header is spaced.
    for spaced in (f"Bearer   {key}", f"bearer {key}"):
        answer = httpx.get(
            f"{stack.api_url}/orders/{uuid4()}/status",
            headers={"Authorization": spaced},
            timeout=10,
        )
        assert answer.status_code == 429
    # Probes and scrapes are never limited.
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert (
            httpx.get(f"{stack.api_url}{path}", headers=_bearer(key), timeout=10).status_code == 200
        )
    refused_after = _metric(stack, "orders_api_rate_limited_total")
    assert refused_after - refused_before == len(refused) + 2


def test_a_header_past_the_credentials_limit_is_refused_not_cut(
    limited: Limited, owner_engine: Engine
) -> None:
    key = _new_key(owner_engine)
    padded = f"Bearer {key}" + " " * MAX_CREDENTIALS + secrets.token_hex(4)
    url = f"{limited.stack.api_url}/orders/{uuid4()}/status"
    with _from("127.0.0.11") as client:
        answer = client.get(url, headers={"Authorization": padded})
        assert answer.status_code == 401  # a new count each time would be a way round the limit
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert client.get(url, headers=_bearer(key)).status_code == 404  # the key itself works


def test_guessing_keys_from_one_address_ends_in_429_and_its_valid_keys_still_pass(
    limited: Limited, engine: Engine, owner_engine: Engine
) -> None:
    customer = add_customer(engine, limit="100.00")
    key = _new_key(owner_engine)
    api = limited.stack.api_url
    refused_before = _metric(limited.stack, "orders_api_rate_limited_total")

    with _from("127.0.0.12") as client:

        def guess() -> httpx.Response:
            made_up = f"osk_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"
            assert keys.key_id_of(made_up)  # well formed: a limit bucket of its own
            return client.get(f"{api}/orders/{uuid4()}/status", headers=_bearer(made_up))

        answers = [guess() for _ in range(LIMIT + 3)]
        # Each key new, the address the same: its failures have one budget.
        assert [a.status_code for a in answers] == [401] * LIMIT + [429] * 3
        refused = answers[-1]
        assert refused.headers["Content-Type"] == "application/problem+json"
        assert refused.json()["status"] == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.headers["RateLimit-Limit"] == str(LIMIT)
        assert refused.headers["RateLimit-Remaining"] == "0"
        # No key at all, or a malformed one: a failure from the same address, refused too.
        assert client.get(f"{api}/customers/{customer}/credit").status_code == 429
        assert (
            client.get(f"{api}/customers/{customer}/credit", headers=_bearer("nope")).status_code
            == 429
        )

        # A valid key from the guessing address is served: only failures are held back.
        for _ in range(3):
            answer = client.get(f"{api}/customers/{customer}/credit", headers=_bearer(key))
            assert answer.status_code == 200
            assert answer.headers["RateLimit-Limit"] == str(LIMIT)
    assert _metric(limited.stack, "orders_api_rate_limited_total") - refused_before == 5


def test_requests_pass_unlimited_while_the_limiters_redis_is_down(limited: Limited) -> None:
    stack = limited.stack
    limited.limiter_redis.stop()  # its counts go with it (it keeps nothing on disk)
    try:
        answers = [
            _get_on_a_new_connection(stack, f"/orders/{uuid4()}/status")[0].status
            for _ in range(LIMIT + 4)
        ]
        assert answers == [404] * (LIMIT + 4)  # fail open: no 429, no 500
        with _from("127.0.0.13") as client:  # failed authentication is not counted: 401
            made_up = client.get(
                f"{stack.api_url}/orders/{uuid4()}/status", headers=_bearer("osk_nope")
            )
            assert made_up.status_code == 401
        assert _metric(stack, "orders_api_rate_limit_unavailable_total") >= LIMIT + 4
        assert "requests pass unlimited" in stack.service("web").log()
    finally:
        limited.limiter_redis.start()


def _order_count(engine: Engine, customer: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(orders).where(orders.c.customer_id == customer)
            ).scalar_one()
        )


def test_orders_are_refused_while_the_saga_lane_is_backed_up_and_admitted_once_it_drains(
    admitting: Stack, engine: Engine
) -> None:
    customer = add_customer(engine, limit="100000.00")
    product = add_product(engine, on_hand=1000)
    api = admitting.client()
    worker = admitting.service("worker")
    worker.stop()  # no one consumes the saga lane: each order leaves two step messages

    accepted: list[str] = []

    def refused() -> httpx.Response | None:
        response = api.place(customer, [(product, 1)])
        if response.status_code == 202:
            accepted.append(response.json()["order_id"])
            return None
        return response

    refusal = wait_for("an order refused for the backlog", refused, timeout=30)
    assert refusal.status_code == 503
    assert refusal.headers["Content-Type"] == "application/problem+json"
    assert int(refusal.headers["Retry-After"]) >= 1
    assert refusal.json()["status"] == 503
    # Admitted while the backlog was at most the bound (two messages an order), or its
    # reading (kept 0.2 s by each API process) a moment old.
    assert len(accepted) > MAX_BACKLOG // 2
    assert _order_count(engine, customer) == len(accepted)  # the refused wrote nothing
    assert api.place(customer, [(product, 1)]).status_code == 503
    assert _order_count(engine, customer) == len(accepted)
    refusals = _metric(admitting, "orders_api_admission_refused_total")
    assert refusals >= 2
    # Without a well-formed key: 401 from authentication, nothing about the backlog.
    body = {"customer_id": customer, "lines": [{"product_id": product, "quantity": 1}]}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"}):
        answer = httpx.post(f"{admitting.api_url}/orders", json=body, headers=headers, timeout=10)
        assert answer.status_code == 401
        assert answer.headers["Content-Type"] == "application/problem+json"
    assert _metric(admitting, "orders_api_admission_refused_total") == refusals

    worker.start()  # the lane drains
    for order_id in accepted:
        assert api.wait_until_final(order_id, timeout=60)["status"] == "CONFIRMED"

    def admitted() -> httpx.Response | None:
        response = api.place(customer, [(product, 1)])
        return response if response.status_code == 202 else None

    late = wait_for("an order admitted again", admitted, timeout=30)
    assert api.wait_until_final(late.json()["order_id"])["status"] == "CONFIRMED"
