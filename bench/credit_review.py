"""The credit check's chunk with a history: every order summed, then only the recent ones.

Starts PostgreSQL, generates ``--orders`` past orders (one in twenty cancelled, the rest
confirmed; stamped over the 180 days before the last hour) for ``--customers`` customers
in SQL, with each customer's credit used their confirmed total, and reviews them in
chunks of 100 as the batch credit check does (``orders.credit_review``):

1. the first review: no checkpoint yet, every order of every customer is summed;
2. a day later, after two new confirmed orders per customer: the checkpoint plus the
   orders changed since;
3. a day after that, nothing new.

For each it prints the chunks' wall time (median, max) and, for the first chunk, the
read's time, the order rows it read and the buffers it touched (``EXPLAIN (ANALYZE,
BUFFERS)``). Every review must find every customer consistent.

    python -m bench.credit_review [--orders 200000] [--customers 1000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

from config.database import make_engine
from config.settings import POOL_PRESETS, Settings
from orders.credit_review import _READ, MARGIN, review_customers
from scripts.services import LocalPostgres
from tests.conftest import migrate

CHUNK = 100

_CUSTOMERS = text(
    "INSERT INTO customers (id, name, credit_limit)"
    " SELECT 'C' || lpad(n::text, 7, '0'), 'c', 1000000000 FROM generate_series(0, :k - 1) n"
)
_HISTORY = text(
    "INSERT INTO orders (id, customer_id, saga_id, status, total, version, created_at,"
    " updated_at) SELECT gen_random_uuid(), 'C' || lpad((n % :k)::text, 7, '0'),"
    " gen_random_uuid(), CASE WHEN n % 20 = 0 THEN 'CANCELLED' ELSE 'CONFIRMED' END,"
    " 10 + n % 90, 2, t, t + interval '40 ms'"
    " FROM (SELECT n, :t0 - interval '180 days' * (1 - (n - 1)::float8 / :n)"
    " - interval '1 hour' AS t FROM generate_series(1, :n) AS n) AS h ORDER BY n"
)
_CREDIT_USED = text(
    "UPDATE customers c SET credit_used = s.used FROM (SELECT customer_id, sum(total) AS used"
    " FROM orders WHERE status = 'CONFIRMED' GROUP BY customer_id) s WHERE c.id = s.customer_id"
)
_A_DAY = text(
    "INSERT INTO orders (id, customer_id, saga_id, status, total, version, created_at,"
    " updated_at) SELECT gen_random_uuid(), c.id, gen_random_uuid(), 'CONFIRMED', 5, 2, t, t"
    " FROM customers c, (VALUES (:a), (:b)) AS v(t);"
    " UPDATE customers SET credit_used = credit_used + 10"
)


def load(owner: Engine, orders: int, customers: int, t0: datetime) -> float:
    """The customers and their past orders; how long it took."""
    began = time.monotonic()
    with owner.begin() as conn:
        conn.execute(_CUSTOMERS, {"k": customers})
        conn.execute(_HISTORY, {"k": customers, "n": orders, "t0": t0})
        conn.execute(_CREDIT_USED)
    with owner.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("orders", "customers"):
            conn.execute(text(f"VACUUM (ANALYZE) {table}"))
    return time.monotonic() - began


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def explain(engine: Engine, ids: list[str], now: datetime) -> str:
    """The read of one chunk: its time, the order rows it read, the buffers it touched."""
    expanded = _READ.compile(engine).construct_expanded_state({"ids": ids, "cut": now - MARGIN})
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL jit = off"))  # as review_customers does
        (plan,) = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + expanded.statement,
            expanded.parameters,
        ).scalar_one()
    top = plan["Plan"]
    rows = sum(
        node["Actual Rows"] * node["Actual Loops"] + node.get("Rows Removed by Filter", 0)
        for node in _nodes(top)
        if node.get("Relation Name") == "orders"
    )
    touched = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    return f"read {plan['Execution Time']:.1f} ms, {rows:,} order rows, {touched:,} buffers"


def review_all(engine: Engine, chunks: list[list[str]], now: datetime) -> list[float]:
    """Review every chunk as the batch does (a transaction each); each chunk's seconds."""
    took = []
    for chunk in chunks:
        began = time.monotonic()
        with engine.begin() as conn:
            reviews = review_customers(conn, chunk, uuid.uuid4(), now)
        took.append(time.monotonic() - began)
        flagged = [review for review in reviews if review.flagged]
        assert not flagged, flagged[:3]
    return took


def measure(owner: Engine, engine: Engine, args: argparse.Namespace) -> None:
    t0 = datetime.now(UTC)
    seconds = load(owner, args.orders, args.customers, t0)
    print(f"{args.orders:,} orders for {args.customers:,} customers loaded in {seconds:.1f} s")
    with engine.connect() as conn:
        ids = list(conn.execute(text("SELECT id FROM customers ORDER BY id")).scalars())
    chunks = [ids[n : n + CHUNK] for n in range(0, len(ids), CHUNK)]
    steps = (
        ("first review (no checkpoint: every order)", t0, None),
        ("a day later (2 new orders a customer)", t0 + timedelta(days=1), _A_DAY),
        ("a day after that (nothing new)", t0 + timedelta(days=2), None),
    )
    for label, now, before in steps:
        if before is not None:
            with owner.begin() as conn:
                conn.execute(
                    before, {"a": now - timedelta(hours=21), "b": now - timedelta(hours=4)}
                )
        plan = explain(engine, chunks[0], now)
        took = review_all(engine, chunks, now)
        print(
            f"{label}: chunk median {statistics.median(took) * 1000:.1f} ms,"
            f" max {max(took) * 1000:.1f} ms ({len(took)} chunks of {CHUNK});"
            f" first chunk's {plan}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--customers", type=int, default=1_000)
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="bench-credit-review-"))
    postgres = LocalPostgres(base, fsync=True)
    postgres.start()
    try:
        postgres.create_database("orders")
        migrate(postgres.url(role="owner"))
        settings = Settings(env="test", database_url=postgres.url(), db_pool=POOL_PRESETS["local"])
        owner = create_engine(postgres.url(role="owner"))
        engine = make_engine(settings, application_name="bench-credit-review")
        try:
            measure(owner, engine, args)
        finally:
            engine.dispose()
            owner.dispose()
    finally:
        postgres.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
