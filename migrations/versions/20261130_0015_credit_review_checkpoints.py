"""the credit review's checkpoints

The credit review used to sum every confirmed order of each customer it reviewed. It
now keeps, per customer, the sum of the confirmed orders last changed before a cut time
(``credit_reviews.checkpoint_total`` and ``checkpoint_at``) and adds the orders changed
since, found through an index on ``orders(customer_id, updated_at)``. The new columns
start empty: each customer's first review after the upgrade sums every order once.

The index is built CONCURRENTLY (outside the migration's transaction): on a table of
millions of orders, orders go on being written while it is built.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "credit_reviews", sa.Column("checkpoint_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "credit_reviews",
        sa.Column("checkpoint_total", sa.Numeric(precision=38, scale=2), nullable=True),
    )
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_orders_customer_updated"
            " ON orders (customer_id, updated_at)"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_orders_customer_updated")
    op.drop_column("credit_reviews", "checkpoint_total")
    op.drop_column("credit_reviews", "checkpoint_at")
