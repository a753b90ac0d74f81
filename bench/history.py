"""Past orders for the benchmark, generated in SQL: months of history behind a live stack.

``load_history`` writes N finished orders as the system would have left them: each with
its lines (1.5 per order), its two events (OrderPlaced, then OrderConfirmed or, one in
twenty, OrderCancelled), its finished saga and the saga's two steps, an idempotency key
for half of them, and every consumer's position at the order's last event. The
customers' credit used and their order summaries take the history in; the consumers'
checkpoints move past it (when they had read everything before it), so neither the feed
nor the integrity check finds anything to do. Time stamps are spread over the months
before ``now`` and the event ids follow them.

All of it is one transaction holding the consumers' checkpoint rows, so the running
consumers skip it instead of reading it as new; ``VACUUM (ANALYZE)`` follows, as
autovacuum would have done on a database that grew over months, and a CHECKPOINT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, create_engine, text

from orders.domain import CancelReason, EventType, OrderStatus
from orders.projections import CacheRefresher, CustomerSummaries
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK
from orders.webhook_deliveries import WebhookOutbox
from workers.partitions import extend

#: The consumers of the events whose positions the history carries.
CONSUMERS = (CacheRefresher.name, CustomerSummaries.name, WebhookOutbox.name)
#: The tables the history fills (vacuumed and analysed after the load).
TABLES = (
    "orders",
    "order_lines",
    "order_events",
    "sagas",
    "saga_steps",
    "idempotency_keys",
    "consumer_positions",
    "customers",
    "customer_order_summaries",
)
#: The client the history's idempotency keys belong to.
CLIENT = "history"


@dataclass
class Loaded:
    """What ``load_history`` did and how long it took."""

    orders: int
    load_seconds: float
    vacuum_seconds: float
    database_bytes: int
    #: Consumers whose checkpoint was behind before the load (they read the history).
    behind: list[str]
    #: Seconds each statement of the load took, by its first words.
    steps: dict[str, float]

    def describe(self) -> str:
        """One line for the log and the report."""
        text_ = (
            f"{self.orders:,} past orders loaded in {self.load_seconds:.1f} s, "
            f"vacuumed and analysed in {self.vacuum_seconds:.1f} s; "
            f"database {self.database_bytes / 2**30:.2f} GiB"
        )
        text_ += " (" + ", ".join(f"{k}: {v:.1f} s" for k, v in self.steps.items()) + ")"
        if self.behind:
            text_ += f" (consumers behind before the load: {', '.join(self.behind)})"
        return text_


_STEPS = [
    # The history's orders, one row each, from which every table below is written.
    """
    CREATE TEMP TABLE history ON COMMIT DROP AS
    SELECT n,
           -- time-ordered ids (UUID version 7, as config.ids makes them) of that time
           CAST(lpad(to_hex(floor(extract(epoch FROM created_at) * 1000)::bigint), 12, '0')
                || '7' || substr(md5(random()::text), 1, 3)
                || to_hex(8 + floor(random() * 4)::int) || substr(md5(random()::text), 1, 15)
                AS uuid) AS order_id,
           CAST(lpad(to_hex(floor(extract(epoch FROM created_at) * 1000)::bigint), 12, '0')
                || '7' || substr(md5(random()::text), 1, 3)
                || to_hex(8 + floor(random() * 4)::int) || substr(md5(random()::text), 1, 15)
                AS uuid) AS saga_id,
           'C' || (n % :customers) AS customer_id,
           created_at,
           CASE WHEN n % 20 = 0 THEN CAST(:cancelled AS text)
                ELSE CAST(:confirmed AS text) END AS status,
           1 + n % 2 AS line_count,
           'P' || (n % :products) AS product_1,
           'P' || ((n + 7) % :products) AS product_2,
           1 + n % 3 AS quantity_1,
           1 + (n + 1) % 3 AS quantity_2
    FROM (SELECT n, now() - :span * (1 - (n - 1)::float8 / :n) - :gap AS created_at
          FROM generate_series(1, :n) AS n) AS series
    """,
    # Every product of the bench costs what its row says: the total follows the lines.
    """
    ALTER TABLE history ADD COLUMN total numeric(14, 2),
                        ADD COLUMN price_1 numeric(12, 2),
                        ADD COLUMN price_2 numeric(12, 2)
    """,
    """
    UPDATE history h SET price_1 = p1.unit_price, price_2 = p2.unit_price,
           total = h.quantity_1 * p1.unit_price
                   + CASE WHEN h.line_count = 2 THEN h.quantity_2 * p2.unit_price ELSE 0 END
    FROM products p1, products p2
    WHERE p1.id = h.product_1 AND p2.id = h.product_2
    """,
    """
    INSERT INTO orders (id, customer_id, saga_id, status, total, cancel_reason, version,
                        created_at, updated_at)
    SELECT order_id, customer_id, saga_id, status, total,
           CASE WHEN status = CAST(:cancelled AS text)
                THEN CAST(:out_of_stock AS text) END,
           2, created_at, created_at + interval '40 milliseconds'
    FROM history ORDER BY n
    """,
    """
    INSERT INTO order_lines (order_id, line_no, product_id, quantity, unit_price)
    SELECT order_id, line_no,
           CASE line_no WHEN 1 THEN product_1 ELSE product_2 END,
           CASE line_no WHEN 1 THEN quantity_1 ELSE quantity_2 END,
           CASE line_no WHEN 1 THEN price_1 ELSE price_2 END
    FROM history, generate_series(1, line_count) AS line_no
    ORDER BY n, line_no
    """,
    # Ids in time order: OrderPlaced, then the outcome 40 ms later.
    """
    INSERT INTO order_events (order_id, seq, type, payload, occurred_at, placed_at)
    SELECT order_id, seq,
           CASE WHEN seq = 1 THEN CAST(:placed_event AS text)
                WHEN status = CAST(:cancelled AS text)
                THEN CAST(:cancelled_event AS text)
                ELSE CAST(:confirmed_event AS text) END,
           CASE WHEN seq = 1 THEN jsonb_build_object('total', total::text)
                WHEN status = CAST(:cancelled AS text)
                THEN jsonb_build_object('reason', CAST(:out_of_stock AS text))
                ELSE '{}'::jsonb END,
           created_at + (seq - 1) * interval '40 milliseconds', created_at
    FROM history, generate_series(1, 2) AS seq
    ORDER BY n, seq
    """,
    """
    INSERT INTO sagas (id, name, state, payload, reason, deadline_at, created_at, finished_at)
    SELECT saga_id, 'order', status,
           jsonb_build_object(
               'order_id', order_id::text, 'customer_id', customer_id, 'amount', total::text,
               'lines', CASE WHEN line_count = 1
                             THEN jsonb_build_array(jsonb_build_array(product_1, quantity_1))
                             ELSE jsonb_build_array(jsonb_build_array(product_1, quantity_1),
                                                    jsonb_build_array(product_2, quantity_2))
                        END),
           CASE WHEN status = CAST(:cancelled AS text)
                THEN CAST(:out_of_stock AS text) END,
           created_at + interval '30 seconds', created_at,
           created_at + interval '40 milliseconds'
    FROM history ORDER BY n
    """,
    # A confirmed saga applied both steps; a cancelled one was refused stock and gave
    # its credit back.
    """
    INSERT INTO saga_steps (saga_id, step, status, reason, started_at, finished_at,
                            compensated_at)
    SELECT saga_id, step,
           CASE WHEN status = CAST(:confirmed AS text) THEN 'APPLIED'
                WHEN step = CAST(:reserve_stock AS text) THEN 'REFUSED'
                ELSE 'COMPENSATED' END,
           CASE WHEN status = CAST(:cancelled AS text) AND step = CAST(:reserve_stock AS text)
                THEN CAST(:out_of_stock AS text) END,
           created_at + interval '5 milliseconds', created_at + interval '20 milliseconds',
           CASE WHEN status = CAST(:cancelled AS text) AND step <> CAST(:reserve_stock AS text)
                THEN created_at + interval '35 milliseconds' END
    FROM history, unnest(CAST(:steps AS text[])) AS step
    ORDER BY n, step
    """,
    """
    INSERT INTO idempotency_keys (client, key, fingerprint, order_id, created_at)
    SELECT CAST(:client AS text), 'history-' || n,
           encode(sha256(convert_to(n::text, 'UTF8')), 'hex'), order_id, created_at
    FROM history WHERE n % 2 = 0 ORDER BY n
    """,
    """
    INSERT INTO consumer_positions (consumer, order_id, last_seq)
    SELECT consumer, order_id, 2 FROM history, unnest(CAST(:consumers AS text[])) AS consumer
    """,
    # What the consumers and the saga would have made of the history.
    """
    INSERT INTO customer_order_summaries AS s
        (customer_id, orders_placed, orders_confirmed, orders_cancelled, placed_total,
         confirmed_total, last_order_at)
    SELECT customer_id, count(*),
           count(*) FILTER (WHERE status = CAST(:confirmed AS text)),
           count(*) FILTER (WHERE status = CAST(:cancelled AS text)),
           sum(total),
           coalesce(sum(total) FILTER (WHERE status = CAST(:confirmed AS text)), 0),
           max(created_at)
    FROM history GROUP BY customer_id
    ON CONFLICT (customer_id) DO UPDATE SET
        orders_placed = s.orders_placed + excluded.orders_placed,
        orders_confirmed = s.orders_confirmed + excluded.orders_confirmed,
        orders_cancelled = s.orders_cancelled + excluded.orders_cancelled,
        placed_total = s.placed_total + excluded.placed_total,
        confirmed_total = s.confirmed_total + excluded.confirmed_total,
        last_order_at = greatest(s.last_order_at, excluded.last_order_at)
    """,
    """
    UPDATE customers c SET credit_used = c.credit_used + h.used,
                           credit_version = c.credit_version + 1
    FROM (SELECT customer_id, sum(total) AS used FROM history
          WHERE status = CAST(:confirmed AS text) GROUP BY customer_id) AS h
    WHERE c.id = h.customer_id
    """,
]


def _lock_checkpoints(conn: Connection) -> dict[str, int]:
    """Hold every consumer's checkpoint row (a running consumer skips a held one)."""
    conn.execute(
        text(
            "INSERT INTO consumer_checkpoints (consumer, last_id, updated_at) "
            "SELECT consumer, 0, now() FROM unnest(CAST(:consumers AS text[])) AS consumer "
            "ON CONFLICT DO NOTHING"
        ),
        {"consumers": list(CONSUMERS)},
    )
    rows = conn.execute(
        text(
            "SELECT consumer, last_id FROM consumer_checkpoints "
            "WHERE consumer = ANY(CAST(:consumers AS text[])) FOR UPDATE"
        ),
        {"consumers": list(CONSUMERS)},
    ).all()
    return {row.consumer: row.last_id for row in rows}


def wait_for_consumers(engine: Engine, timeout: float = 60.0) -> None:
    """Wait (up to ``timeout``) until every consumer's checkpoint is at the newest event."""
    deadline = time.monotonic() + timeout
    query = text(
        "SELECT coalesce((SELECT max(id) FROM order_events), 0) "
        "- coalesce((SELECT min(last_id) FROM consumer_checkpoints "
        "WHERE consumer = ANY(CAST(:consumers AS text[]))), 0)"
    )
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(query, {"consumers": list(CONSUMERS)}).scalar_one() <= 0:
                return
        time.sleep(0.2)


def load_history(
    owner_url: str,
    n: int,
    *,
    customers: int,
    products: int,
    span: timedelta = timedelta(days=180),
    gap: timedelta = timedelta(hours=1),
    admin_url: str | None = None,
) -> Loaded:
    """Write ``n`` past orders (see the module's doc) as the database's owner, over the
    ``span`` that ends ``gap`` before now, for customers C0.. and products P0.. . With
    ``admin_url`` (the superuser) a CHECKPOINT follows, so the load's writes are not
    still being flushed while the next run is measured."""
    engine = create_engine(owner_url)
    try:
        wait_for_consumers(engine)
        began, steps = time.monotonic(), dict[str, float]()
        # The history's months get partitions of their own, as the migration makes for
        # the orders a database already has (not the DEFAULT partition).
        first = datetime.now(UTC) - gap - span
        extend(engine, ahead=span.days // 28 + 2, now=first)
        steps["make month partitions"] = time.monotonic() - began
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            checkpoints = _lock_checkpoints(conn)
            before = conn.execute(
                text("SELECT coalesce(max(id), 0) FROM order_events")
            ).scalar_one()
            params = {
                "n": n,
                "customers": customers,
                "products": products,
                "span": span,
                "gap": gap,
                "consumers": list(CONSUMERS),
                "confirmed": OrderStatus.CONFIRMED.value,
                "cancelled": OrderStatus.CANCELLED.value,
                "out_of_stock": CancelReason.OUT_OF_STOCK.value,
                "placed_event": EventType.ORDER_PLACED.value,
                "confirmed_event": EventType.ORDER_CONFIRMED.value,
                "cancelled_event": EventType.ORDER_CANCELLED.value,
                "reserve_stock": RESERVE_STOCK,
                "steps": [RESERVE_STOCK, RESERVE_CREDIT],
                "client": CLIENT,
            }
            for statement in _STEPS:
                started = time.monotonic()
                conn.execute(text(statement), params)
                steps[" ".join(statement.split()[:3])] = time.monotonic() - started
            # A consumer that had read everything before the history is past it now; one
            # that had not will read it (as duplicates) on its way.
            behind = [name for name, last in checkpoints.items() if last < before]
            conn.execute(
                text(
                    "UPDATE consumer_checkpoints SET updated_at = now(), "
                    "last_id = (SELECT max(id) FROM order_events) "
                    "WHERE consumer = ANY(CAST(:ready AS text[]))"
                ),
                {"ready": [name for name in checkpoints if name not in behind]},
            )
        loaded = time.monotonic()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for table in TABLES:
                conn.execute(text(f"VACUUM (ANALYZE) {table}"))
            size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
        if admin_url is not None:
            admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
            try:
                with admin.connect() as conn:
                    conn.execute(text("CHECKPOINT"))
            finally:
                admin.dispose()
        return Loaded(
            orders=n,
            load_seconds=loaded - began,
            vacuum_seconds=time.monotonic() - loaded,
            database_bytes=int(size),
            behind=behind,
            steps=steps,
        )
    finally:
        engine.dispose()
