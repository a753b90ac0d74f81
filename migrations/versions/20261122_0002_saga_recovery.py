"""saga recovery: redrive and attempt counters, errors, COMPENSATION_FAILED

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SAGA_STATES = "'RUNNING', 'CONFIRMED', 'CANCELLED'"
ORDER_STATUSES = "'PENDING', 'CONFIRMED', 'CANCELLED'"


def upgrade() -> None:
    op.add_column("sagas", sa.Column("error", sa.Text(), nullable=True))
    op.add_column("sagas", sa.Column("redrives", sa.Integer(), server_default="0", nullable=False))
    op.add_column(
        "sagas", sa.Column("recovery_attempts", sa.Integer(), server_default="0", nullable=False)
    )
    op.drop_constraint("ck_sagas_known_state", "sagas", type_="check")
    op.create_check_constraint(
        op.f("ck_sagas_known_state"), "sagas", f"state IN ({SAGA_STATES}, 'COMPENSATION_FAILED')"
    )
    op.drop_index("ix_sagas_running_deadline", table_name="sagas")
    op.create_index(
        "ix_sagas_active_deadline",
        "sagas",
        ["deadline_at"],
        postgresql_where=sa.text("state IN ('RUNNING', 'COMPENSATION_FAILED')"),
    )
    op.add_column("orders", sa.Column("problem", sa.Text(), nullable=True))
    op.drop_constraint("ck_orders_known_status", "orders", type_="check")
    op.create_check_constraint(
        op.f("ck_orders_known_status"), "orders", f"status IN ({ORDER_STATUSES}, 'COMPENSATION_FAILED')"
    )


def downgrade() -> None:
    op.drop_constraint("ck_orders_known_status", "orders", type_="check")
    op.create_check_constraint(op.f("ck_orders_known_status"), "orders", f"status IN ({ORDER_STATUSES})")
    op.drop_column("orders", "problem")
    op.drop_index("ix_sagas_active_deadline", table_name="sagas")
    op.create_index(
        "ix_sagas_running_deadline",
        "sagas",
        ["deadline_at"],
        postgresql_where=sa.text("state = 'RUNNING'"),
    )
    op.drop_constraint("ck_sagas_known_state", "sagas", type_="check")
    op.create_check_constraint(op.f("ck_sagas_known_state"), "sagas", f"state IN ({SAGA_STATES})")
    op.drop_column("sagas", "recovery_attempts")
    op.drop_column("sagas", "redrives")
    op.drop_column("sagas", "error")
