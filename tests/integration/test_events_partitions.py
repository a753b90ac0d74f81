"""The order events by month: migration 0016 moves a filled table into monthly
partitions and back, appends land in their order's month with the primary key still
refusing a duplicate seq, the feed keeps its order and its indexes, and the owner's
command makes months, moves stray events out of DEFAULT and drops a month only when
every event of it is done with."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError

from orders import services
from orders.domain import OrderLine, PlaceOrder
from orders.saga import RESERVE_CREDIT, RESERVE_STOCK, OrderSaga
from sagas import runner
from tests.conftest import ROOT, Servers, migrate
from tests.fakes import RecordingLauncher
from tests.helpers import add_customer, add_product
from workers import partitions

DATABASE = "orders_partitions"
#: 10,000 orders of two events each, placed over the last four months.
ORDERS = 10_000

_FILL = """
WITH made AS (
    INSERT INTO orders (id, customer_id, saga_id, status, total, version, created_at,
                        updated_at)
    SELECT gen_random_uuid(), 'P', gen_random_uuid(), 'CONFIRMED', 1, 2,
           date_trunc('month', now()) - (g % 4) * interval '1 month' + g * interval '1 s',
           now()
      FROM generate_series(1, :orders) AS g
    RETURNING id, created_at)
INSERT INTO order_events (order_id, seq, type, payload, occurred_at)
SELECT id, seq, 'E', '{}', created_at + seq * interval '1 ms'
  FROM made, generate_series(1, 2) AS seq
 ORDER BY random()
"""
_FEED = "SELECT id, order_id, seq FROM order_events ORDER BY id"


@pytest.fixture(scope="module")
def owner(servers: Servers) -> Iterator[Engine]:
    """A database of this module's own, filled at 0015, then migrated to the head."""
    servers.postgres.create_database(DATABASE)
    engine = create_engine(servers.postgres.url(DATABASE, role="owner"))
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def app(servers: Servers, owner: Engine) -> Iterator[Engine]:
    engine = create_engine(servers.postgres.url(DATABASE))
    yield engine
    engine.dispose()


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["configure_logger"] = False
    return config


def feed(engine: Engine) -> list[tuple[int, UUID, int]]:
    with engine.connect() as conn:
        return [(row.id, row.order_id, row.seq) for row in conn.execute(text(_FEED))]


def test_the_migration_moves_a_filled_table_into_months_and_back(owner: Engine) -> None:
    url = owner.url.render_as_string(hide_password=False)
    migrate(url, "0015")
    with owner.begin() as conn:
        conn.execute(text("INSERT INTO customers (id, name, credit_limit) VALUES ('P', 'p', 1)"))
        conn.execute(text(_FILL), {"orders": ORDERS})
    before = feed(owner)
    assert len(before) == 2 * ORDERS

    migrate(url)

    assert feed(owner) == before  # every event, in the same feed order
    with owner.connect() as conn:
        misplaced = conn.execute(
            text(
                "SELECT count(*) FROM order_events e JOIN orders o ON o.id = e.order_id"
                " WHERE e.placed_at <> o.created_at OR e.tableoid <> to_regclass("
                "'partitions.order_events_' || to_char(o.created_at AT TIME ZONE 'UTC',"
                " 'YYYY_MM'))"
            )
        ).scalar_one()
        assert misplaced == 0  # each in its order's month, none in DEFAULT
        months = partitions.existing(conn)
    now = partitions.month_of(datetime.now(UTC))
    assert len(months) == 4 + 12 and months[3] == now
    with pytest.raises(IntegrityError), owner.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO order_events (order_id, seq, type, occurred_at, placed_at)"
                " SELECT order_id, seq, 'Again', now(), placed_at FROM order_events LIMIT 1"
            )
        )
    with owner.begin() as conn:  # the feed's numbers go on from where they were
        appended = conn.execute(
            text(
                "INSERT INTO order_events (order_id, seq, type, occurred_at, placed_at)"
                " SELECT order_id, 3, 'Later', now(), placed_at FROM order_events LIMIT 1"
                " RETURNING id"
            )
        ).scalar_one()
    assert appended > before[-1][0]

    command.downgrade(alembic_config(url), "0015")
    assert feed(owner)[: len(before)] == before
    with owner.connect() as conn:
        assert conn.execute(text("SELECT to_regnamespace('partitions')")).scalar() is None
    migrate(url)
    assert feed(owner)[: len(before)] == before


def test_appends_land_in_their_orders_month(owner: Engine, app: Engine) -> None:
    migrate(owner.url.render_as_string(hide_password=False))
    customer, product = add_customer(app, limit="100.00"), add_product(app, on_hand=5)
    launcher = RecordingLauncher()
    accepted = services.place_order(
        app, PlaceOrder(customer, (OrderLine(product, 1),), client="p"), launcher
    )
    (start,) = launcher.launched
    saga = OrderSaga()
    runner.run_step(app, saga, start.saga_id, RESERVE_STOCK, start.payload)
    runner.run_step(app, saga, start.saga_id, RESERVE_CREDIT, start.payload)
    runner.complete(app, saga, start.saga_id, retry_after=timedelta(seconds=60))

    with owner.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT e.seq, e.tableoid::regclass::text, e.placed_at = o.created_at"
                " FROM order_events e JOIN orders o ON o.id = e.order_id"
                " WHERE e.order_id = :id ORDER BY e.seq"
            ),
            {"id": accepted.order_id},
        ).all()
    month = partitions.month_of(datetime.now(UTC)).table
    assert [tuple(row) for row in rows] == [(1, month, True), (2, month, True)]


def test_the_feed_and_an_orders_log_are_read_through_indexes(owner: Engine) -> None:
    migrate(owner.url.render_as_string(hide_password=False))
    with owner.connect() as conn:
        conn.execute(text("ANALYZE order_events"))
        filled = (
            conn.execute(
                text(
                    "SELECT DISTINCT c.relname FROM order_events e"
                    " JOIN pg_class c ON c.oid = e.tableoid"
                )
            )
            .scalars()
            .all()
        )
        some = conn.execute(text("SELECT order_id FROM order_events LIMIT 1")).scalar_one()
        plans = [
            "\n".join(conn.execute(text(f"EXPLAIN {query}"), {"id": some}).scalars())
            for query in (
                "SELECT * FROM order_events WHERE id > 100 ORDER BY id LIMIT 500",  # the feed
                "SELECT * FROM order_events WHERE order_id = :id ORDER BY seq",  # an order's log
            )
        ]
    assert len(filled) >= 4
    for plan in plans:  # an empty month is read whole: it costs nothing
        for name in filled:
            assert f"Seq Scan on {name} " not in plan, plan
    assert "Merge Append" in plans[0], plans[0]


def test_the_owner_moves_stray_events_into_a_month_and_drops_a_month_when_done(
    owner: Engine,
) -> None:
    migrate(owner.url.render_as_string(hide_password=False))
    long_ago = datetime.now(UTC) - timedelta(days=3 * 365)
    with owner.begin() as conn:  # one consumer here, "projector" (the migrations start others)
        conn.execute(text("DELETE FROM consumer_checkpoints WHERE consumer <> 'projector'"))
    with owner.begin() as conn:  # an order older than every month: its events in DEFAULT
        order_id = conn.execute(
            text(
                "INSERT INTO orders (id, customer_id, saga_id, status, total, version,"
                " created_at, updated_at) VALUES (gen_random_uuid(), 'P', gen_random_uuid(),"
                " 'CONFIRMED', 1, 2, :at, :at) RETURNING id"
            ),
            {"at": long_ago},
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO order_events (order_id, seq, type, occurred_at, placed_at)"
                " SELECT :id, seq, 'E', :at, :at FROM generate_series(1, 2) AS seq"
            ),
            {"id": order_id, "at": long_ago},
        )
        assert conn.execute(text(f"SELECT count(*) FROM {partitions.DEFAULT}")).scalar() == 2  # noqa: S608

    old = partitions.month_of(long_ago)
    assert old in partitions.extend(owner, ahead=12)
    with owner.connect() as conn:
        assert partitions.in_default(conn) == []
        assert conn.execute(text(f"SELECT count(*) FROM {old.table}")).scalar() == 2  # noqa: S608

    def verdict() -> partitions.Verdict:
        (found,) = (
            v for v in partitions.drop(owner, timedelta(days=30), ["projector"]) if v.month == old
        )
        return found

    assert verdict().reasons == ("2 events wait for projector, which has no checkpoint",)
    with owner.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO consumer_checkpoints (consumer, last_id, updated_at)"
                " SELECT 'projector', max(id), now() FROM order_events"
            )
        )
    assert verdict().reasons == ("2 events are not applied by projector",)
    with owner.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO consumer_positions (consumer, order_id, last_seq)"
                " VALUES ('projector', :id, 2)"
            ),
            {"id": order_id},
        )
    assert verdict().dropped
    with owner.connect() as conn:
        assert old not in partitions.existing(conn)
        assert (
            conn.execute(
                text("SELECT count(*) FROM orders WHERE id = :id"), {"id": order_id}
            ).scalar()
            == 1
        )
