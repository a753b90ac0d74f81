"""An open-loop HTTP load generator on raw asyncio streams (cheap on a 2-core machine).

Request i is due at ``start + i / rate`` whether or not earlier ones were answered, and
its latency counts from that moment: a slow server shows as latency, not as a quietly
lower offered rate (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Sample:
    """One request: when it was due, when answered, and the answer."""

    due: float
    done: float = 0.0
    status: int = 0
    body: bytes = b""

    @property
    def latency(self) -> float:
        """Seconds from due to answered."""
        return self.done - self.due


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, bytes]:
    writer.write(raw)
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def post_json(host: str, path: str, body: dict[str, object], headers: dict[str, str]) -> bytes:
    """The bytes of one keep-alive POST with a JSON body."""
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n{head}\r\n"
    ).encode() + payload


async def _run(
    host: str,
    port: int,
    make: Callable[[int], bytes],
    rate: float,
    duration: float,
    connections: int,
) -> list[Sample]:
    count = int(rate * duration)
    samples = [Sample(0.0) for _ in range(count)]
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection(host, port))
    start = time.monotonic() + 0.05

    async def one(n: int) -> None:
        sample = samples[n]
        sample.due = start + n / rate
        await asyncio.sleep(max(0.0, sample.due - time.monotonic()))
        conn = await idle.get()
        try:
            sample.status, sample.body = await _request(*conn, make(n))
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            sample.status = 0
            conn = await asyncio.open_connection(host, port)
        sample.done = time.monotonic()
        idle.put_nowait(conn)

    await asyncio.gather(*(one(n) for n in range(count)))
    while not idle.empty():
        idle.get_nowait()[1].close()
    return samples


def run_load(
    host: str,
    port: int,
    make: Callable[[int], bytes],
    *,
    rate: float,
    duration: float,
    connections: int = 32,
) -> list[Sample]:
    """Offer ``rate`` requests/s for ``duration`` seconds; return every sample."""
    return asyncio.run(_run(host, port, make, rate, duration, connections))
