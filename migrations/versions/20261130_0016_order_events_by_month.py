"""order events partitioned by month; the retention scan's cursor

``order_events`` becomes a table partitioned by RANGE on ``placed_at``, the order's
``created_at`` copied into each of its events: one partition per month, in the schema
``partitions``, and a DEFAULT partition for any month without one. The primary key
(order_id, seq, placed_at) still refuses a duplicate seq of an order, since an order's
events share its ``placed_at``; the feed's ``id`` keeps its numbers and its sequence,
unique with the partition key and indexed in every partition. The migration makes the
months of the existing orders and the next ``AHEAD`` months; the schema's owner makes
later ones, splits the DEFAULT partition and drops a month whose events are all past
retention (``python -m workers.partitions``).

The rows are moved in one statement while the table is locked: writers wait for the
whole migration (docs/performance.md gives the time per million events).

``retention_cursors`` keeps where the retention job's scan of the feed stopped.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

#: Months made past the current one (the owner's command makes later ones).
AHEAD = 12
SCHEMA = "partitions"


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    ]


def _foreign_key() -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["order_id"],
        ["orders.id"],
        name=op.f("fk_order_events_order_id_orders"),
        ondelete="CASCADE",
    )


def _set_aside() -> None:
    """The table as it is, renamed, with the names of its keys and sequence freed."""
    op.execute("LOCK TABLE order_events IN ACCESS EXCLUSIVE MODE")
    op.execute("ALTER TABLE order_events RENAME TO order_events_old")
    for name in ("pk_order_events", "uq_order_events_id"):
        op.execute(f"ALTER TABLE order_events_old RENAME CONSTRAINT {name} TO {name}_old")
    op.execute("ALTER SEQUENCE order_events_id_seq RENAME TO order_events_old_id_seq")


def _renumber() -> None:
    """The new table's sequence goes on where the old one was (no id is given twice),
    and the old table goes."""
    op.execute(
        "SELECT setval('order_events_id_seq', last_value, is_called) FROM order_events_old_id_seq"
    )
    op.drop_table("order_events_old")


def upgrade() -> None:
    op.create_table(
        "retention_cursors",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_retention_cursors")),
    )
    _set_aside()
    op.create_table(
        "order_events",
        *_columns(),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_order_events_seq_positive")),
        _foreign_key(),
        sa.PrimaryKeyConstraint("order_id", "seq", "placed_at", name=op.f("pk_order_events")),
        sa.UniqueConstraint("id", "placed_at", name=op.f("uq_order_events_id")),
        postgresql_partition_by="RANGE (placed_at)",
    )
    op.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    # Every month from the oldest order's to AHEAD months past the newest (or now), UTC.
    months = (
        op.get_bind()
        .execute(
            sa.text(
                """
                SELECT to_char(m, 'YYYY_MM'), m, m + interval '1 month'
                  FROM generate_series(
                      date_trunc('month', coalesce((SELECT min(created_at) FROM orders), now())
                                         AT TIME ZONE 'UTC'),
                      date_trunc('month', greatest((SELECT max(created_at) FROM orders), now())
                                         AT TIME ZONE 'UTC') + :ahead * interval '1 month',
                      interval '1 month') AS m
                """
            ),
            {"ahead": AHEAD},
        )
        .all()
    )
    for suffix, start, end in months:
        op.execute(
            f"CREATE TABLE {SCHEMA}.order_events_{suffix} PARTITION OF order_events"
            f" FOR VALUES FROM ('{start:%Y-%m-%d} 00:00:00+00') TO ('{end:%Y-%m-%d} 00:00:00+00')"
        )
    op.execute(f"CREATE TABLE {SCHEMA}.order_events_default PARTITION OF order_events DEFAULT")
    op.execute(
        """
        INSERT INTO order_events (id, order_id, seq, type, payload, occurred_at, placed_at)
        SELECT e.id, e.order_id, e.seq, e.type, e.payload, e.occurred_at, o.created_at
          FROM order_events_old e JOIN orders o ON o.id = e.order_id
        """
    )
    _renumber()
    op.execute("ANALYZE order_events")


def downgrade() -> None:
    _set_aside()
    op.create_table(
        "order_events",
        *_columns(),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_order_events_seq_positive")),
        _foreign_key(),
        sa.PrimaryKeyConstraint("order_id", "seq", name=op.f("pk_order_events")),
        sa.UniqueConstraint("id", name=op.f("uq_order_events_id")),
    )
    op.execute(
        """
        INSERT INTO order_events (id, order_id, seq, type, payload, occurred_at)
        SELECT id, order_id, seq, type, payload, occurred_at FROM order_events_old
        """
    )
    _renumber()  # the partitions go with their table
    op.execute(f"DROP SCHEMA IF EXISTS {SCHEMA}")
    op.drop_table("retention_cursors")
