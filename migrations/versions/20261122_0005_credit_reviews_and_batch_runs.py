"""credit reviews and batch runs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A lowered credit limit may now sit below what a customer uses; the batch credit
    # review flags it. Reservations still never pass the limit (conditional UPDATE).
    op.drop_constraint("ck_customers_within_limit", "customers", type_="check")
    op.create_table('credit_reviews',
    sa.Column('customer_id', sa.String(length=64), nullable=False),
    sa.Column('run_id', sa.Uuid(), nullable=False),
    sa.Column('credit_limit', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('credit_used', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('credit_reserved', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('available', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('over_limit', sa.Boolean(), nullable=False),
    sa.Column('inconsistent', sa.Boolean(), nullable=False),
    sa.Column('findings', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('reviewed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_credit_reviews_customer_id_customers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('customer_id', name=op.f('pk_credit_reviews'))
    )
    op.create_index('ix_credit_reviews_flagged', 'credit_reviews', ['customer_id'], unique=False, postgresql_where=sa.text('over_limit OR inconsistent'))
    op.create_table('batch_runs',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('job', sa.String(length=64), nullable=False),
    sa.Column('window_key', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('chunks', sa.Integer(), nullable=False),
    sa.Column('processed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('failed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('flagged', sa.Integer(), server_default='0', nullable=False),
    sa.Column('chunks_done', sa.Integer(), server_default='0', nullable=False),
    sa.Column('chunks_failed', sa.Integer(), server_default='0', nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('RUNNING', 'FINISHED')", name=op.f('ck_batch_runs_known_state')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_batch_runs')),
    sa.UniqueConstraint('job', 'window_key', name='uq_batch_runs_job_window')
    )
    op.create_table('batch_chunks',
    sa.Column('run_id', sa.Uuid(), nullable=False),
    sa.Column('chunk', sa.Integer(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("state IN ('DONE', 'FAILED')", name=op.f('ck_batch_chunks_known_state')),
    sa.ForeignKeyConstraint(['run_id'], ['batch_runs.id'], name=op.f('fk_batch_chunks_run_id_batch_runs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'chunk', name=op.f('pk_batch_chunks'))
    )


def downgrade() -> None:
    op.create_check_constraint(
        op.f("ck_customers_within_limit"), "customers",
        "credit_used + credit_reserved <= credit_limit",
    )
    op.drop_table('batch_chunks')
    op.drop_table('batch_runs')
    op.drop_index('ix_credit_reviews_flagged', table_name='credit_reviews', postgresql_where=sa.text('over_limit OR inconsistent'))
    op.drop_table('credit_reviews')
