"""the events integrity check's watermarks

The integrity check used to compare every order with every consumer's position on each
run. It now looks at the orders changed since its last pass (an index on
``orders(updated_at, id)``) and sweeps the whole history a small batch per run, keeping
where it is in ``consumer_checks``.

The index is built CONCURRENTLY (outside the migration's transaction): on a table of
millions of orders, orders go on being written while it is built.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consumer_checks",
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("checked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pass_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cursor_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cursor_id", sa.Uuid(), nullable=True),
        sa.Column("swept_after", sa.Uuid(), nullable=True),
        sa.Column("swept_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", name=op.f("pk_consumer_checks")),
    )
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_updated ON orders (updated_at, id)"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_orders_updated")
    op.drop_table("consumer_checks")
