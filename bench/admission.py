"""Admission control under overload: orders offered at twice the sustainable rate.

Starts the same stack as ``make bench`` (bench.run) with admission control on, finds the
highest rate of orders it sustains (p99 completion under ``SLO_SECONDS``, nothing
refused), then offers twice that for a bounded time and prints: orders accepted and
refused, the refusals' latency (p50/p99) and the accepted orders' completion p99.

    python -m bench.admission [--rates 25,50,...] [--duration 10] [--overload 20]
        [--max-backlog N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from bench.httpload import Sample, post_json, run_load
from bench.run import CUSTOMERS, PRODUCTS, SLO_SECONDS, Bench, climb, quantile
from config.settings import DEFAULT_ADMISSION_MAX_BACKLOG
from tests.conftest import API_KEY

DEFAULT_RATES = (10, 20, 30, 40, 50, 60, 80, 100, 125, 150, 175, 200)


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
        body = {
            "customer_id": f"C{bench.rng.randrange(CUSTOMERS)}",
            "lines": [{"product_id": f"P{bench.rng.randrange(PRODUCTS)}", "quantity": 1}],
        }
        return post_json("127.0.0.1", "/orders", body, auth)

    samples = run_load(
        "127.0.0.1", bench.stack.api_port, order, rate=rate, duration=duration, connections=32
    )
    return samples, completions(bench, since)


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
        default=DEFAULT_ADMISSION_MAX_BACKLOG,
        help="ADMISSION_MAX_BACKLOG (messages in the saga lane)",
    )
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    env = {"ADMISSION_MAX_BACKLOG": str(args.max_backlog)}
    with tempfile.TemporaryDirectory(prefix="orders-bench-admission-") as base:
        bench = Bench(Path(base), args.concurrency, events=True, extra_env=env)
        try:
            bench.start()
            print(
                f"admission bench: ADMISSION_MAX_BACKLOG={args.max_backlog}, worker -c "
                f"{args.concurrency} -E, {args.duration:.0f} s per rate",
                flush=True,
            )
            levels = climb(bench, {"saga": bench.sagas}, rates, args.duration, print)["saga"]
            sustained = [level.rate for level in levels if level.sustained]
            if not sustained:
                print("no rate sustained: nothing to overload")
                return 1
            rate = 2 * max(sustained)
            time.sleep(2)
            samples, took = overload(bench, rate, args.overload)
        finally:
            bench.stop()
    accepted = [s for s in samples if s.status == 202]
    refused = [s.latency for s in samples if s.status == 503]
    other = len(samples) - len(accepted) - len(refused)
    print(
        f"sustainable: {max(sustained):.0f} orders/s (p99 completion < {SLO_SECONDS:.0f} s)\n"
        f"offered {rate:.0f}/s for {args.overload:.0f} s: {len(samples)} orders\n"
        f"  accepted {len(accepted)} ({len(accepted) / args.overload:.1f}/s), "
        f"refused {len(refused)}, other answers {other}\n"
        f"  refusal latency p50 {quantile(refused, 0.5) * 1000:.1f} ms, "
        f"p99 {quantile(refused, 0.99) * 1000:.1f} ms\n"
        f"  accepted orders: {len(took)} finished, completion "
        f"p50 {quantile(took, 0.5) * 1000:.0f} ms, p99 {quantile(took, 0.99) * 1000:.0f} ms",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
