"""the saga's trace context

``sagas.trace_context`` keeps the W3C traceparent of the request that accepted the
order (config.tracing), so that the outbox relay and the deadline sweeper, when they
dispatch or complete the saga later, join the order's trace. NULL when traces are off,
and for the sagas accepted before this revision. A nullable column without a default:
adding it rewrites nothing.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sagas", sa.Column("trace_context", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("sagas", "trace_context")
