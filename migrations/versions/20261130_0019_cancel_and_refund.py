"""cancel and refund: the REFUNDED status, confirmed_at, the refund saga's link, refunded
totals, and the answers to keyed cancel and refund requests

- ``orders.status`` may be ``REFUNDED``. The new CHECK is added NOT VALID and validated
  after: orders go on being written while the table is scanned.
- ``orders.confirmed_at``, set by confirmation. The existing confirmed orders get their
  ``updated_at`` (the time they were confirmed: nothing changed them since), one UPDATE
  of every confirmed order: the credit review tells with it whether an order refunded
  since a checkpoint was inside the checkpoint's sum.
- ``orders.refund_saga_id``: the refund saga of the order (unique where set).
- ``customer_order_summaries`` counts refunded orders and their total.
- ``order_action_keys``: the answer to each cancel or refund request that carried an
  Idempotency-Key.

Revision ID: 0019
Revises: 0018
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_OLD_STATUSES = "'PENDING', 'CONFIRMED', 'CANCELLED', 'COMPENSATION_FAILED'"


def _status_check(statuses: str) -> None:
    op.drop_constraint("ck_orders_known_status", "orders", type_="check")
    op.execute(
        f"ALTER TABLE orders ADD CONSTRAINT ck_orders_known_status"
        f" CHECK (status IN ({statuses})) NOT VALID"
    )
    op.execute("ALTER TABLE orders VALIDATE CONSTRAINT ck_orders_known_status")


def upgrade() -> None:
    _status_check(f"{_OLD_STATUSES}, 'REFUNDED'")
    op.add_column("orders", sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("orders", sa.Column("refund_saga_id", sa.Uuid(), nullable=True))
    op.execute("UPDATE orders SET confirmed_at = updated_at WHERE status = 'CONFIRMED'")
    op.create_index(
        "uq_orders_refund_saga_id",
        "orders",
        ["refund_saga_id"],
        unique=True,
        postgresql_where=sa.text("refund_saga_id IS NOT NULL"),
    )
    op.add_column(
        "customer_order_summaries",
        sa.Column("orders_refunded", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column(
        "customer_order_summaries",
        sa.Column(
            "refunded_total", sa.Numeric(precision=38, scale=2), server_default="0", nullable=False
        ),
    )
    op.create_table(
        "order_action_keys",
        sa.Column("client", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("answer", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_order_action_keys_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("client", "key", name=op.f("pk_order_action_keys")),
    )
    op.create_index(
        "ix_order_action_keys_created_at", "order_action_keys", ["created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_order_action_keys_created_at", table_name="order_action_keys")
    op.drop_table("order_action_keys")
    op.drop_column("customer_order_summaries", "refunded_total")
    op.drop_column("customer_order_summaries", "orders_refunded")
    op.drop_index("uq_orders_refund_saga_id", table_name="orders")
    op.drop_column("orders", "refund_saga_id")
    op.drop_column("orders", "confirmed_at")
    # A refunded order was confirmed, then given back: the old schema knows no better.
    op.execute("UPDATE orders SET status = 'CONFIRMED' WHERE status = 'REFUNDED'")
    _status_check(_OLD_STATUSES)
