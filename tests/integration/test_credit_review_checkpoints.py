"""The credit review's checkpoints on real PostgreSQL: a review reads the orders changed
since the customer's last one, still finds a credit used that disagrees with the orders,
counts each order once, late commits included, and a full review sums everything.

On a database of this module's own: its orders have no events or sagas (the review does
not read them), which the session's integrity check and retention would trip over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from sqlalchemy import Engine, insert, select, text, update

from config.database import make_engine
from config.settings import Settings
from orders.credit_review import _READ, MARGIN, Review, clear_checkpoints, review_customers
from orders.domain import OrderStatus
from orders.tables import credit_reviews, customers, orders
from tests.conftest import ROOT, Servers, migrate
from tests.helpers import add_customer
from workers.tables import batch_runs

DATABASE = "orders_credit_review"
T0 = datetime.now(UTC)


@pytest.fixture(scope="module")
def settings(settings: Settings, servers: Servers) -> Settings:
    """The session's settings, on a database of this module's own."""
    servers.postgres.create_database(DATABASE)
    migrate(servers.postgres.url(DATABASE, role="owner"))
    return replace(settings, database_url=servers.postgres.url(DATABASE))


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings, application_name="orders-tests-credit-review")
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def owner_engine(settings: Settings, servers: Servers) -> Iterator[Engine]:
    engine = make_engine(
        replace(settings, database_url=servers.postgres.url(DATABASE, role="owner")),
        application_name="orders-tests-credit-review-owner",
    )
    yield engine
    engine.dispose()


def confirm(engine: Engine, customer: str, total: str, *, stamped: datetime) -> None:
    """A confirmed order stamped at ``stamped``, its total added to the credit used in the
    same transaction (as confirming an order does)."""
    with engine.begin() as conn:
        conn.execute(
            insert(orders).values(
                id=uuid.uuid4(),
                customer_id=customer,
                saga_id=uuid.uuid4(),
                status=OrderStatus.CONFIRMED.value,
                total=Decimal(total),
                version=2,
                created_at=stamped,
                updated_at=stamped,
            )
        )
        conn.execute(
            update(customers)
            .where(customers.c.id == customer)
            .values(credit_used=customers.c.credit_used + Decimal(total))
        )


def review(engine: Engine, customer: str, now: datetime, **kwargs: Any) -> Review:
    with engine.begin() as conn:
        (found,) = review_customers(conn, [customer], uuid.uuid4(), now, **kwargs)
    return found


def checkpoint(engine: Engine, customer: str) -> tuple[datetime | None, Decimal | None]:
    r = credit_reviews.c
    with engine.connect() as conn:
        row = conn.execute(
            select(r.checkpoint_at, r.checkpoint_total).where(r.customer_id == customer)
        ).one()
    return row.checkpoint_at, row.checkpoint_total


def test_a_checkpoint_still_finds_a_credit_used_changed_by_hand(
    engine: Engine, owner_engine: Engine
) -> None:
    customer = add_customer(engine, limit="1000.00")
    confirm(engine, customer, "40.00", stamped=T0 - timedelta(days=30))
    assert not review(engine, customer, T0).flagged
    assert checkpoint(engine, customer) == (T0 - MARGIN, Decimal("40.00"))

    with owner_engine.begin() as conn:
        conn.execute(
            update(customers).where(customers.c.id == customer).values(credit_used=Decimal("45"))
        )
    tampered = review(engine, customer, T0 + timedelta(hours=2))
    assert tampered.inconsistent
    assert tampered.findings == ("credit used 45.00 but confirmed orders total 40.00",)
    assert checkpoint(engine, customer) == (T0 + timedelta(hours=1), Decimal("40.00"))


def test_an_order_confirmed_after_the_checkpoint_is_counted_once(engine: Engine) -> None:
    customer = add_customer(engine, limit="1000.00")
    confirm(engine, customer, "40.00", stamped=T0 - timedelta(days=30))
    review(engine, customer, T0)
    confirm(engine, customer, "7.50", stamped=T0 + timedelta(seconds=1))

    # Within the margin: counted, not yet in the checkpoint; then in it; then from it.
    for later, settled in ((timedelta(minutes=1), "40.00"), (timedelta(hours=2), "47.50")):
        assert not review(engine, customer, T0 + later).flagged
        assert checkpoint(engine, customer)[1] == Decimal(settled)
    assert not review(engine, customer, T0 + timedelta(hours=3)).flagged
    assert checkpoint(engine, customer) == (T0 + timedelta(hours=2), Decimal("47.50"))


def test_an_order_stamped_before_a_review_and_committed_after_it_is_counted(
    engine: Engine,
) -> None:
    kept, unguarded = add_customer(engine, limit="1000.00"), add_customer(engine, limit="1000.00")
    assert not review(engine, kept, T0).flagged
    assert not review(engine, unguarded, T0, margin=timedelta(0)).flagged
    # Both confirmed by a transaction that stamped them 10 minutes before the review
    # and committed after it.
    for customer in (kept, unguarded):
        confirm(engine, customer, "12.00", stamped=T0 - timedelta(minutes=10))

    assert not review(engine, kept, T0 + timedelta(hours=2)).flagged
    assert checkpoint(engine, kept)[1] == Decimal("12.00")
    # Without a margin the checkpoint had passed it: the figures look wrong until a
    # full review sums every order again.
    assert review(engine, unguarded, T0 + timedelta(hours=2)).inconsistent
    with engine.begin() as conn:
        assert clear_checkpoints(conn) >= 2
    assert checkpoint(engine, unguarded) == (None, None)
    assert not review(engine, unguarded, T0 + timedelta(hours=3)).flagged


def test_start_full_forgets_the_checkpoints_then_starts_a_run(
    engine: Engine, settings: Settings, servers: Servers, tmp_path: Path
) -> None:
    customer = add_customer(engine, limit="1000.00")
    review(engine, customer, T0)
    broker = servers.redis.url(27)
    try:
        started = subprocess.run(
            [sys.executable, "-m", "workers.batch", "start", "--full"],
            cwd=ROOT,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "RUN_DIR": str(tmp_path),
                "APP_ENV": "test",
                "DATABASE_URL": settings.database_url,
                "REDIS_URL": broker,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        Redis.from_url(broker).flushdb()
    assert started.returncode == 0, started.stderr
    answer = json.loads(started.stdout)
    assert answer["checkpoints_cleared"] >= 1
    assert checkpoint(engine, customer) == (None, None)
    with engine.connect() as conn:
        run = conn.execute(select(batch_runs).where(batch_runs.c.id == answer["run_id"])).one()
    assert run.total >= 1


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


#: Past confirmed orders, 10.00 each, one an hour before ``t0`` going back, for each of
#: the customers given.
_HISTORY = text(
    "INSERT INTO orders (id, customer_id, saga_id, status, total, version, created_at,"
    " updated_at) SELECT gen_random_uuid(), c, gen_random_uuid(), 'CONFIRMED', 10, 2, t, t"
    " FROM unnest(CAST(:customers AS text[])) AS c,"
    " (SELECT :t0 - n * interval '1 hour' AS t FROM generate_series(1, :n) AS n) AS past"
)


def test_a_review_with_a_checkpoint_reads_only_the_orders_changed_since(
    engine: Engine, owner_engine: Engine
) -> None:
    customer, *others = (add_customer(engine, limit="1000000.00") for _ in range(20))
    with engine.begin() as conn:
        conn.execute(
            _HISTORY, {"customers": [customer, *others], "t0": T0 - timedelta(days=1), "n": 300}
        )
        conn.execute(update(customers).where(customers.c.id == customer).values(credit_used=3000))
    assert not review(engine, customer, T0).flagged
    confirm(engine, customer, "5.00", stamped=T0 + timedelta(seconds=1))
    with owner_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE orders"))

    expanded = _READ.compile(engine).construct_expanded_state(
        {"ids": [customer], "cut": T0 + timedelta(minutes=1)}
    )
    with engine.connect() as conn:
        (plan,) = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + expanded.statement, expanded.parameters
        ).scalar_one()
    nodes = list(plan_nodes(plan["Plan"]))
    since = next(n for n in nodes if n.get("Index Name") == "ix_orders_customer_updated")
    assert "updated_at >=" in since["Index Cond"], since
    # Rows read from orders: the one changed since the checkpoint, none of the 300 before.
    on_orders = [n for n in nodes if n.get("Relation Name") == "orders"]
    read = sum(
        n["Actual Rows"] * n["Actual Loops"] + n.get("Rows Removed by Filter", 0) for n in on_orders
    )
    assert read <= 2, on_orders
    assert not review(engine, customer, T0 + timedelta(minutes=1)).flagged


def _confirmed(engine: Engine, customer: str, total: str, *, stamped: datetime) -> uuid.UUID:
    """A confirmed order as confirmation writes it (``confirmed_at`` too); its id."""
    order_id = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(
            insert(orders).values(
                id=order_id,
                customer_id=customer,
                saga_id=uuid.uuid4(),
                status=OrderStatus.CONFIRMED.value,
                total=Decimal(total),
                version=2,
                created_at=stamped,
                updated_at=stamped,
                confirmed_at=stamped,
            )
        )
        conn.execute(
            update(customers)
            .where(customers.c.id == customer)
            .values(credit_used=customers.c.credit_used + Decimal(total))
        )
    return order_id


def _refund(engine: Engine, customer: str, order_id: uuid.UUID, *, stamped: datetime) -> None:
    """The order refunded at ``stamped``, its total given back to the credit, in one
    transaction (as the refund saga's steps and completion do, together)."""
    with engine.begin() as conn:
        total = conn.execute(
            update(orders)
            .where(orders.c.id == order_id)
            .values(
                status=OrderStatus.REFUNDED.value,
                updated_at=stamped,
                version=orders.c.version + 2,
            )
            .returning(orders.c.total)
        ).scalar_one()
        conn.execute(
            update(customers)
            .where(customers.c.id == customer)
            .values(credit_used=customers.c.credit_used - total)
        )


def test_orders_refunded_since_the_checkpoint_are_taken_off_once(engine: Engine) -> None:
    customer = add_customer(engine, limit="1000.00")
    month_ago = T0 - timedelta(days=30)
    early = _confirmed(engine, customer, "40.00", stamped=month_ago)
    _confirmed(engine, customer, "25.00", stamped=month_ago)
    late = _confirmed(engine, customer, "30.00", stamped=month_ago)
    assert not review(engine, customer, T0).flagged
    assert checkpoint(engine, customer) == (T0 - MARGIN, Decimal("95.00"))

    # Confirmed before the checkpoint, refunded since: inside its sum, taken off.
    _refund(engine, customer, early, stamped=T0 + timedelta(minutes=10))
    # Confirmed and refunded since: counts nothing.
    both = _confirmed(engine, customer, "15.00", stamped=T0 + timedelta(minutes=20))
    _refund(engine, customer, both, stamped=T0 + timedelta(minutes=30))
    # Refunded within the margin before the next review: past its cut.
    _refund(engine, customer, late, stamped=T0 + timedelta(hours=2, minutes=30))

    second = review(engine, customer, T0 + timedelta(hours=3))
    assert not second.flagged, second.findings
    # The late refund is after the new cut: still in the checkpoint, taken off next time.
    assert checkpoint(engine, customer) == (T0 + timedelta(hours=2), Decimal("55.00"))

    third = review(engine, customer, T0 + timedelta(hours=5))
    assert not third.flagged, third.findings
    assert checkpoint(engine, customer) == (T0 + timedelta(hours=4), Decimal("25.00"))
    with engine.begin() as conn:
        clear_checkpoints(conn)
    assert not review(engine, customer, T0 + timedelta(hours=6)).flagged
    assert checkpoint(engine, customer)[1] == Decimal("25.00")
