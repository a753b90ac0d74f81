"""Clients that send slowly do not stall the API, and the answers gunicorn itself gives
(before the application sees a request) are problem details like every other error."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from sqlalchemy import Engine

from config.settings import Settings
from tests.conftest import API_KEY, Servers
from tests.harness.processes import Stack
from tests.helpers import add_customer, add_product, wait_for

pytestmark = pytest.mark.e2e

#: More slow connections of each kind than the old gthread workers had threads (2 x 4).
SLOW_BODIES = SLOW_HEADERS = 20
#: "Not stalled", not a speed target: each probe answers within this.
ANSWER_WITHIN = 2.0


def own_stack(settings: Settings, servers: Servers, name: str, db: int, **env: str) -> Stack:
    """A stack of its own (own broker databases), so the session's is not disturbed."""
    own = replace(
        settings, broker_url=servers.redis.url(db), result_backend_url=servers.redis.url(db + 1)
    )
    return Stack(own, servers.base / name, extra_env=env)


@pytest.fixture(scope="module")
def slow_stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    """The API as configured (gevent workers), for slow clients to lean on."""
    stack = own_stack(settings, servers, "e2e-slow-clients", 56)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def gthread_stack(settings: Settings, servers: Servers) -> Iterator[Stack]:
    """The API on the fallback worker class (WEB_WORKER=gthread)."""
    stack = own_stack(settings, servers, "e2e-gthread", 58, WEB_WORKER="gthread")
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@dataclass
class Slow:
    """One kind of slow connection: what it sends first, then a little at a time."""

    head: bytes
    drip: bytes
    sockets: list[socket.socket]
    opened: int = 0
    closed_by_server: int = 0


class SlowClients:
    """Connections sending a request's body, or its head, a few bytes every half second;
    one the server closes is opened again (as an attacker would)."""

    def __init__(self, port: int, bodies: int, headers: int) -> None:
        self.port = port
        self.body = Slow(
            b"POST /orders HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 4096\r\n\r\n",
            b" ",
            [],
        )
        self.header = Slow(b"GET /healthz HTTP/1.1\r\nHost: api\r\n", b"X-Slow: 1\r\n", [])
        self.body.sockets = [self._open(self.body) for _ in range(bodies)]
        self.header.sockets = [self._open(self.header) for _ in range(headers)]
        #: Rounds of drips sent so far.
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, daemon=True)
        self._thread.start()

    def _open(self, kind: Slow) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        conn.sendall(kind.head)
        kind.opened += 1
        return conn

    def _drip(self) -> None:
        while not self._stop.wait(0.5):
            for kind in (self.body, self.header):
                for n, conn in enumerate(kind.sockets):
                    readable, _, _ = select.select([conn], [], [], 0)
                    try:
                        if readable:  # an answer or the end: the server gave up on it
                            raise ConnectionError
                        conn.sendall(kind.drip)
                    except OSError:
                        kind.closed_by_server += 1
                        conn.close()
                        kind.sockets[n] = self._open(kind)
            self.rounds += 1

    def close(self) -> None:
        """Stop sending and close every connection."""
        self._stop.set()
        self._thread.join(10)
        for conn in self.body.sockets + self.header.sockets:
            conn.close()


def test_slow_clients_do_not_stall_the_api(slow_stack: Stack, engine: Engine) -> None:
    customer = add_customer(engine, limit="1000000.00")
    product = add_product(engine, on_hand=1000)
    api = slow_stack.client()
    web = slow_stack.service("web")
    workers = sorted(web.children())

    slow = SlowClients(slow_stack.api_port, SLOW_BODIES, SLOW_HEADERS)
    try:
        wait_for("the slow requests under way", lambda: slow.rounds >= 2, timeout=10)
        for _ in range(10):
            health = api.http.get("/healthz", timeout=ANSWER_WITHIN)
            assert health.status_code == 200
            order = api.http.post(
                "/orders",
                json={"customer_id": customer, "lines": [{"product_id": product, "quantity": 1}]},
                timeout=ANSWER_WITHIN,
            )
            assert order.status_code == 202, order.text
        # The slow bodies were all still being read meanwhile: more requests in flight
        # than the workers had threads before.
        assert slow.body.closed_by_server == 0
    finally:
        slow.close()

    assert sorted(web.children()) == workers, "a gunicorn worker was replaced"
    assert api.http.get("/healthz", timeout=ANSWER_WITHIN).status_code == 200


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers, body


MALFORMED = {
    "request line over 4094 bytes": (
        b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: api\r\n\r\n",
        {414},
    ),
    "a header field over 8190 bytes": (
        b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Big: " + b"a" * 8200 + b"\r\n\r\n",
        {431, 400},
    ),
    "more than 100 header fields": (
        b"GET /healthz HTTP/1.1\r\nHost: api\r\n"
        + b"".join(b"X-H%d: 1\r\n" % n for n in range(101))
        + b"\r\n",
        {431, 400},
    ),
    "a garbage request line": (b"\x01\x02 what is this\r\n\r\n", {400}),
}


@pytest.mark.parametrize("worker", ["gevent", "gthread"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_gunicorn_refusals_are_problem_details(
    case: str, worker: str, request: pytest.FixtureRequest
) -> None:
    stack: Stack = request.getfixturevalue("slow_stack" if worker == "gevent" else "gthread_stack")
    raw, statuses = MALFORMED[case]

    status, headers, body = raw_exchange(stack.api_port, raw)

    assert status in statuses
    assert headers["content-type"] == "application/problem+json"
    assert int(headers["content-length"]) == len(body)
    problem = json.loads(body)
    assert problem["status"] == status
    assert problem["title"]
