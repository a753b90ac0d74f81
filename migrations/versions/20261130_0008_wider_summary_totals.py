"""wider customer summary totals

A customer's running totals add up many orders, each up to NUMERIC(14, 2): they get
room for any number of orders.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_COLUMNS = ("placed_total", "confirmed_total")


def upgrade() -> None:
    _retype(sa.Numeric(38, 2), sa.Numeric(14, 2))


def downgrade() -> None:
    _retype(sa.Numeric(14, 2), sa.Numeric(38, 2))


def _retype(new: sa.Numeric, old: sa.Numeric) -> None:
    for column in _COLUMNS:
        op.alter_column(
            "customer_order_summaries",
            column,
            type_=new,
            existing_type=old,
            existing_nullable=False,
            existing_server_default="0",
        )
