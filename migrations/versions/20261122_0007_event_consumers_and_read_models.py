"""event consumers, read models and the credit version

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "customers",
        sa.Column("credit_version", sa.BigInteger(), server_default="0", nullable=False),
    )
    # The consumers' feed: existing events are numbered in the order they were written.
    op.add_column(
        "order_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
    )
    op.create_unique_constraint(op.f("uq_order_events_id"), "order_events", ["id"])
    op.create_table(
        "consumer_checkpoints",
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", name=op.f("pk_consumer_checkpoints")),
    )
    op.create_table(
        "consumer_positions",
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_consumer_positions_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("consumer", "order_id", name=op.f("pk_consumer_positions")),
    )
    op.create_table(
        "customer_order_summaries",
        sa.Column("customer_id", sa.String(length=64), nullable=False),
        sa.Column("orders_placed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("orders_confirmed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("orders_cancelled", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "placed_total", sa.Numeric(precision=14, scale=2), server_default="0", nullable=False
        ),
        sa.Column(
            "confirmed_total",
            sa.Numeric(precision=14, scale=2),
            server_default="0",
            nullable=False,
        ),
        sa.Column("last_order_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["customers.id"],
            name=op.f("fk_customer_order_summaries_customer_id_customers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_customer_order_summaries")),
    )
    op.create_index(
        "ix_orders_active_customer",
        "orders",
        ["customer_id"],
        unique=False,
        postgresql_where=sa.text("status IN ('PENDING', 'COMPENSATION_FAILED')"),
    )


def downgrade() -> None:
    op.drop_index("ix_orders_active_customer", table_name="orders")
    op.drop_table("customer_order_summaries")
    op.drop_table("consumer_positions")
    op.drop_table("consumer_checkpoints")
    op.drop_constraint(op.f("uq_order_events_id"), "order_events", type_="unique")
    op.drop_column("order_events", "id")
    op.drop_column("customers", "credit_version")
