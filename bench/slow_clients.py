"""Slow clients against the API: does everyone else still get answers?

Starts PostgreSQL and Redis, then the API under gunicorn and a saga worker (the test
harness's Stack), once per gunicorn worker class named. Against each it

1. times another client's ``GET /healthz`` and ``POST /orders`` (a fresh connection
   each, one after the other) for a few quiet seconds;
2. holds ``--slow-body`` connections that send a POST's headers and then its body one
   byte a second, and ``--slow-headers`` connections that send a request's head one
   header line a second, for ``--hold`` seconds (a connection the server closes is
   opened again, as an attacker would), and times the same probes meanwhile;
3. offers plain ``POST /orders`` as fast as ``--load-connections`` keep-alive
   connections get answers, for ``--load`` seconds: the throughput of the worker class.

It prints, per worker class and phase, the probes' p50/p99/max and how many failed
(no answer within ``--probe-timeout``, or not 200/202), how many slow connections were
open at the end and how many the server closed, and whether gunicorn's workers are
the ones it started with.

    python -m bench.slow_clients [--workers gthread,gevent] [--slow-body 50]
        [--slow-headers 50] [--hold 30] [--load 15]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import insert

from bench.httpload import post_json
from config.database import make_engine
from config.settings import POOL_PRESETS, Settings
from orders.tables import customers, products
from scripts.services import LocalPostgres, LocalRedis
from tests.conftest import API_KEY, migrate, register_test_keys
from tests.harness.processes import Stack

HOST = "127.0.0.1"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ORDER: dict[str, object] = {
    "customer_id": "C-slow",
    "lines": [{"product_id": "P-slow", "quantity": 1}],
}
#: The body a slow client announces (under the API's 64 KiB limit) and never finishes.
SLOW_BODY_LENGTH = 4096


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank), or NaN."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Probes:
    """One kind of probe's latencies (seconds) and failures."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    def line(self, name: str) -> str:
        """The figures, in milliseconds."""
        ms = [latency * 1000 for latency in self.latencies]
        return (
            f"{name:<13} n={len(ms):<4} p50={quantile(ms, 0.5):7.1f} ms  "
            f"p99={quantile(ms, 0.99):7.1f} ms  max={max(ms, default=float('nan')):7.1f} ms  "
            f"failed={self.failures}"
        )


@dataclass
class SlowCounts:
    """What happened to one kind of slow connection."""

    opened: int = 0
    #: Still open when the hold ended.
    held_to_end: int = 0
    closed_by_server: int = 0


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response: its status and its body (by Content-Length)."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def exchange(port: int, raw: bytes, timeout: float) -> tuple[int, bytes]:
    """Send one request on a fresh connection; return the status and body."""

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(raw)
            await writer.drain()
            return await read_response(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


async def probe(port: int, until: float, timeout: float) -> dict[str, Probes]:
    """Time /healthz and POST /orders, alternately, until ``until``."""
    requests = {
        "GET /healthz": (
            f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode(),
            200,
        ),
        "POST /orders": (post_json(HOST, "/orders", ORDER, {**AUTH, "Connection": "close"}), 202),
    }
    results = {name: Probes() for name in requests}
    while time.monotonic() < until:
        for name, (raw, expected) in requests.items():
            began = time.monotonic()
            try:
                status, _ = await exchange(port, raw, timeout)
            except (OSError, TimeoutError, ValueError, IndexError, asyncio.IncompleteReadError):
                status = 0
            took = time.monotonic() - began
            if status == expected:
                results[name].latencies.append(took)
            else:
                results[name].failures += 1
            await asyncio.sleep(max(0.0, 0.05 - took))
    return results


async def slow_client(
    port: int, head: bytes, drip: bytes, counts: SlowCounts, until: float, start_in: float
) -> None:
    """Send ``head``, then ``drip`` once a second, until ``until``; reopen if closed."""
    await asyncio.sleep(start_in)
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        counts.opened += 1
        answered = asyncio.ensure_future(reader.read(1))
        try:
            writer.write(head)
            while time.monotonic() < until:
                await writer.drain()
                done, _ = await asyncio.wait({answered}, timeout=1.0)
                if done:  # an answer or the end of the connection: the server gave up
                    counts.closed_by_server += 1
                    break
                writer.write(drip)
            else:
                counts.held_to_end += 1
        except OSError:
            counts.closed_by_server += 1
        finally:
            answered.cancel()
            writer.close()


async def attack(
    port: int, slow_body: int, slow_headers: int, hold: float, probe_timeout: float
) -> tuple[dict[str, Probes], dict[str, SlowCounts]]:
    """Hold the slow connections for ``hold`` seconds while probing."""
    until = time.monotonic() + hold
    counts = {"slow body": SlowCounts(), "slow headers": SlowCounts()}
    body_head = (
        f"POST /orders HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {SLOW_BODY_LENGTH}\r\n\r\n"
    ).encode()
    header_head = f"GET /healthz HTTP/1.1\r\nHost: {HOST}\r\n".encode()
    # Opened over the first second, so the probes meet them already in place.
    clients = [
        slow_client(port, body_head, b" ", counts["slow body"], until, n / slow_body)
        for n in range(slow_body)
    ] + [
        slow_client(
            port, header_head, b"X-Slow: 1\r\n", counts["slow headers"], until, n / slow_headers
        )
        for n in range(slow_headers)
    ]
    tasks = [asyncio.ensure_future(client) for client in clients]
    await asyncio.sleep(1.5)
    probes = await probe(port, until, probe_timeout)
    await asyncio.gather(*tasks)
    return probes, counts


async def load(port: int, seconds: float, connections: int) -> tuple[int, int, list[float]]:
    """Closed-loop POST /orders on keep-alive connections: (accepted, other, latencies)."""
    raw = post_json(HOST, "/orders", ORDER, AUTH)
    until = time.monotonic() + seconds
    accepted, other, latencies = 0, 0, []

    async def one_connection() -> None:
        nonlocal accepted, other
        reader, writer = await asyncio.open_connection(HOST, port)
        while time.monotonic() < until:
            began = time.monotonic()
            try:
                writer.write(raw)
                await writer.drain()
                status, _ = await read_response(reader)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                other += 1
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
                continue
            latencies.append(time.monotonic() - began)
            if status == 202:
                accepted += 1
            else:
                other += 1
        writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return accepted, other, latencies


def seed(settings: Settings) -> None:
    """A customer and a product that never run out."""
    engine = make_engine(settings, application_name="bench-slow-clients")
    with engine.begin() as conn:
        conn.execute(insert(customers), [{"id": "C-slow", "name": "bench", "credit_limit": 10**10}])
        conn.execute(
            insert(products),
            [{"id": "P-slow", "name": "bench", "unit_price": 1, "on_hand": 10**9}],
        )
    engine.dispose()


def measure(stack: Stack, args: argparse.Namespace) -> None:
    """Every phase against one running stack; print the figures."""
    port = stack.api_port
    web = stack.service("web")
    workers_before = sorted(web.children())
    quiet = asyncio.run(probe(port, time.monotonic() + args.quiet, args.probe_timeout))
    print("  quiet:")
    for name, result in quiet.items():
        print("    " + result.line(name))
    probes, counts = asyncio.run(
        attack(port, args.slow_body, args.slow_headers, args.hold, args.probe_timeout)
    )
    print(f"  {args.slow_body} slow-body + {args.slow_headers} slow-header connections:")
    for name, result in probes.items():
        print("    " + result.line(name))
    for name, count in counts.items():
        print(
            f"    {name:<13} opened={count.opened} held to the end={count.held_to_end} "
            f"closed by the server={count.closed_by_server}"
        )
    workers_after = sorted(web.children())
    print(f"    gunicorn workers unchanged: {workers_before == workers_after}")
    if args.load > 0:
        accepted, other, latencies = asyncio.run(load(port, args.load, args.load_connections))
        ms = [latency * 1000 for latency in latencies]
        print(
            f"  POST /orders, {args.load_connections} connections, {args.load:.0f} s: "
            f"{accepted / args.load:.0f} accepted/s, other={other}, "
            f"p50={quantile(ms, 0.5):.1f} ms p99={quantile(ms, 0.99):.1f} ms"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default="gthread,gevent", help="WEB_WORKER values")
    parser.add_argument("--slow-body", type=int, default=50)
    parser.add_argument("--slow-headers", type=int, default=50)
    parser.add_argument("--hold", type=float, default=30.0)
    parser.add_argument("--quiet", type=float, default=5.0)
    parser.add_argument("--probe-timeout", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=15.0, help="seconds; 0: none")
    parser.add_argument("--load-connections", type=int, default=16)
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="bench-slow-"))
    postgres = LocalPostgres(base, fsync=True)
    redis = LocalRedis(base, password=secrets.token_hex(12))
    postgres.start()
    try:
        redis.start()
        postgres.create_database("orders")
        migrate(postgres.url(role="owner"))
        settings = Settings(
            env="test",
            database_url=postgres.url(),
            db_pool=POOL_PRESETS["local"],
            broker_url=redis.url(0),
            result_backend_url=redis.url(1),
        )
        register_test_keys(settings, postgres.url(role="owner"))
        seed(settings)
        for worker in args.workers.split(","):
            stack = Stack(settings, base / f"logs-{worker}", extra_env={"WEB_WORKER": worker})
            print(f"WEB_WORKER={worker}", flush=True)
            stack.start()
            try:
                measure(stack, args)
            finally:
                stack.stop()
    finally:
        redis.stop()
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
