"""Admission control under overload: orders offered at twice the sustainable rate.

Starts the same stack as ``make bench`` (bench.run), finds the highest rate of orders it
sustains (p99 completion under ``SLO_SECONDS``) without admission control, restarts the
API with a backlog bound the workers clear in a third of the SLO at that rate (or
``--max-backlog``), then offers twice that rate for a bounded time and prints: orders
accepted and refused, the refusals' latency (p50/p99) and the accepted orders'
completion p50/p99.

    python -m bench.admission [--rates 25,50,...] [--duration 10] [--overload 20]
        [--max-backlog N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import text

from bench.httpload import Sample, post_json, run_load
from bench.run import CUSTOMERS, PRODUCTS, SLO_SECONDS, Bench, climb, quantile
from config.settings import DEFAULT_ADMISSION_MAX_BACKLOG
from tests.conftest import API_KEY

DEFAULT_RATES = (5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 125, 150, 175, 200)
#: Messages one saga puts in the saga lane (a chord: two steps, then its body).
MESSAGES_PER_SAGA = 3
#: The longest an accepted order should wait in the lane: a third of the SLO, leaving
#: the rest for its own work and the machine's noise.
TARGET_WAIT_SECONDS = SLO_SECONDS / 3


def completions(bench: Bench, since: float, timeout: float = 60.0) -> list[float]:
    """Seconds from acceptance to decision of every saga created since ``since``, once
    all are finished (or ``timeout`` passed)."""
    query = text(
        "SELECT count(*) FILTER (WHERE finished_at IS NULL) AS busy, "
        "array_agg(extract(epoch FROM finished_at - created_at)) AS took "
        "FROM sagas WHERE created_at >= to_timestamp(:since)"
    )
    deadline = time.monotonic() + timeout
    while True:
        with bench.engine.connect() as conn:
            row = conn.execute(query, {"since": since}).one()
        if row.busy == 0 or time.monotonic() > deadline:
            return [float(t) for t in (row.took or []) if t is not None]
        time.sleep(0.2)


def overload(bench: Bench, rate: float, duration: float) -> tuple[list[Sample], list[float]]:
    """Offer orders at ``rate`` for ``duration`` s; the answers, and the accepted orders'
    completion times."""
    since = time.time()
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def order(n: int) -> bytes:
        body: dict[str, object] = {
            "customer_id": f"C{bench.rng.randrange(CUSTOMERS)}",
            "lines": [{"product_id": f"P{bench.rng.randrange(PRODUCTS)}", "quantity": 1}],
        }
        return post_json("127.0.0.1", "/orders", body, auth)

    # As bench.run: each connection used more often than the keep-alive timeout (2 s).
    connections = max(4, min(32, int(rate / 2)))
    samples = run_load(
        "127.0.0.1",
        bench.stack.api_port,
        order,
        rate=rate,
        duration=duration,
        connections=connections,
    )
    return samples, completions(bench, since)


def restart_api(bench: Bench, max_backlog: int) -> None:
    """Restart the API processes with admission control at ``max_backlog`` messages."""
    web = bench.stack.service("web")
    web.stop()
    web.env["ADMISSION_MAX_BACKLOG"] = str(max_backlog)
    web.start()
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{bench.stack.api_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API never became ready:\n{web.log()[-3000:]}")
        time.sleep(0.1)


def bound_for(rate: float) -> int:
    """The backlog (messages) the saga workers clear in ``TARGET_WAIT_SECONDS`` at
    ``rate`` sagas/s."""
    return max(MESSAGES_PER_SAGA, round(rate * MESSAGES_PER_SAGA * TARGET_WAIT_SECONDS))


def main(argv: list[str] | None = None) -> int:
    """Measure the sustainable rate, then offer twice it; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default=",".join(str(r) for r in DEFAULT_RATES))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--overload", type=float, default=20.0, help="seconds at twice it")
    parser.add_argument("--concurrency", type=int, default=3, help="saga worker processes")
    parser.add_argument(
        "--max-backlog",
        type=int,
        default=0,
        help="ADMISSION_MAX_BACKLOG while overloaded (messages in the saga lane); by "
        "default what the sustainable rate clears in a third of the SLO "
        f"(the setting's own default, {DEFAULT_ADMISSION_MAX_BACKLOG}, is sized for "
        "about 100 orders/s)",
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="orders-bench-admission-") as base:
        # The sustainable rate is measured without admission control.
        bench = Bench(
            Path(base), args.concurrency, events=True, extra_env={"ADMISSION_MAX_BACKLOG": "0"}
        )
        try:
            bench.start()
            print(
                f"admission bench: worker -c {args.concurrency} -E, {args.duration:.0f} s "
                "per rate, admission control off",
                flush=True,
            )
            bench.sagas(5, 3)  # warm up: connections, caches, first imports (not counted)
            levels = climb(bench, {"saga": bench.sagas}, rates, args.duration, print)["saga"]
            sustained = [level.rate for level in levels if level.sustained]
            if not sustained:
                print("no rate sustained: nothing to overload")
                return 1
            rate = 2 * max(sustained)
            bound = args.max_backlog or bound_for(max(sustained))
            print(f"API restarted with ADMISSION_MAX_BACKLOG={bound}", flush=True)
            restart_api(bench, bound)
            time.sleep(2)
            samples, took = overload(bench, rate, args.overload)
        finally:
            bench.stop()
    accepted = [s for s in samples if s.status == 202]
    refused = [s.latency for s in samples if s.status == 503]
    other = Counter(s.status for s in samples if s.status not in (202, 503))
    print(
        f"sustainable: {max(sustained):.0f} orders/s (p99 completion < {SLO_SECONDS:.0f} s)\n"
        f"ADMISSION_MAX_BACKLOG={bound} messages\n"
        f"offered {rate:.0f}/s for {args.overload:.0f} s: {len(samples)} orders\n"
        f"  accepted {len(accepted)} ({len(accepted) / args.overload:.1f}/s), "
        f"refused {len(refused)}, other answers {dict(other) or 'none'}\n"
        f"  refusal latency p50 {quantile(refused, 0.5) * 1000:.1f} ms, "
        f"p99 {quantile(refused, 0.99) * 1000:.1f} ms\n"
        f"  accepted orders: {len(took)} finished, completion "
        f"p50 {quantile(took, 0.5) * 1000:.0f} ms, p99 {quantile(took, 0.99) * 1000:.0f} ms",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
