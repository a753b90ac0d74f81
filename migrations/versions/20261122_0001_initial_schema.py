"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('customers',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('credit_limit', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('credit_used', sa.Numeric(precision=14, scale=2), server_default='0', nullable=False),
    sa.Column('credit_reserved', sa.Numeric(precision=14, scale=2), server_default='0', nullable=False),
    sa.CheckConstraint('credit_limit >= 0', name=op.f('ck_customers_limit_not_negative')),
    sa.CheckConstraint('credit_reserved >= 0', name=op.f('ck_customers_reserved_not_negative')),
    sa.CheckConstraint('credit_used + credit_reserved <= credit_limit', name=op.f('ck_customers_within_limit')),
    sa.CheckConstraint('credit_used >= 0', name=op.f('ck_customers_used_not_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_customers'))
    )
    op.create_table('products',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('unit_price', sa.Numeric(precision=12, scale=2), nullable=False),
    sa.Column('on_hand', sa.Integer(), nullable=False),
    sa.Column('reserved', sa.Integer(), server_default='0', nullable=False),
    sa.CheckConstraint('on_hand >= 0', name=op.f('ck_products_on_hand_not_negative')),
    sa.CheckConstraint('reserved <= on_hand', name=op.f('ck_products_reserved_within_on_hand')),
    sa.CheckConstraint('reserved >= 0', name=op.f('ck_products_reserved_not_negative')),
    sa.CheckConstraint('unit_price >= 0', name=op.f('ck_products_price_not_negative')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_products'))
    )
    op.create_table('orders',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('customer_id', sa.String(length=64), nullable=False),
    sa.Column('saga_id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('total', sa.Numeric(precision=14, scale=2), nullable=False),
    sa.Column('cancel_reason', sa.String(length=64), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("status IN ('PENDING', 'CONFIRMED', 'CANCELLED')", name=op.f('ck_orders_known_status')),
    sa.CheckConstraint('total >= 0', name=op.f('ck_orders_total_not_negative')),
    sa.CheckConstraint('version >= 1', name=op.f('ck_orders_version_positive')),
    sa.ForeignKeyConstraint(['customer_id'], ['customers.id'], name=op.f('fk_orders_customer_id_customers')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_orders')),
    sa.UniqueConstraint('saga_id', name=op.f('uq_orders_saga_id'))
    )
    op.create_index('ix_orders_customer_created', 'orders', ['customer_id', 'created_at'], unique=False)
    op.create_table('idempotency_keys',
    sa.Column('client', sa.String(length=64), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('order_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], name=op.f('fk_idempotency_keys_order_id_orders'), ondelete='CASCADE', initially='DEFERRED', deferrable=True),
    sa.PrimaryKeyConstraint('client', 'key', name=op.f('pk_idempotency_keys'))
    )
    op.create_table('order_events',
    sa.Column('order_id', sa.Uuid(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('seq >= 1', name=op.f('ck_order_events_seq_positive')),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], name=op.f('fk_order_events_order_id_orders'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('order_id', 'seq', name=op.f('pk_order_events'))
    )
    op.create_table('order_lines',
    sa.Column('order_id', sa.Uuid(), nullable=False),
    sa.Column('line_no', sa.Integer(), nullable=False),
    sa.Column('product_id', sa.String(length=64), nullable=False),
    sa.Column('quantity', sa.Integer(), nullable=False),
    sa.Column('unit_price', sa.Numeric(precision=12, scale=2), nullable=False),
    sa.CheckConstraint('quantity > 0', name=op.f('ck_order_lines_quantity_positive')),
    sa.CheckConstraint('unit_price >= 0', name=op.f('ck_order_lines_price_not_negative')),
    sa.ForeignKeyConstraint(['order_id'], ['orders.id'], name=op.f('fk_order_lines_order_id_orders'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['product_id'], ['products.id'], name=op.f('fk_order_lines_product_id_products')),
    sa.PrimaryKeyConstraint('order_id', 'line_no', name=op.f('pk_order_lines'))
    )
    op.create_table('sagas',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('payload', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('deadline_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("state IN ('RUNNING', 'CONFIRMED', 'CANCELLED')", name=op.f('ck_sagas_known_state')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_sagas'))
    )
    op.create_index('ix_sagas_running_deadline', 'sagas', ['deadline_at'], unique=False, postgresql_where=sa.text("state = 'RUNNING'"))
    op.create_table('outbox',
    sa.Column('saga_id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['saga_id'], ['sagas.id'], name=op.f('fk_outbox_saga_id_sagas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('saga_id', name=op.f('pk_outbox'))
    )
    op.create_index('ix_outbox_created_at', 'outbox', ['created_at'], unique=False)
    op.create_table('saga_steps',
    sa.Column('saga_id', sa.Uuid(), nullable=False),
    sa.Column('step', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('compensated_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(status = 'COMPENSATED') = (compensated_at IS NOT NULL)", name=op.f('ck_saga_steps_compensated_has_time')),
    sa.CheckConstraint("status IN ('APPLIED', 'REFUSED', 'ABORTED', 'COMPENSATED')", name=op.f('ck_saga_steps_known_status')),
    sa.ForeignKeyConstraint(['saga_id'], ['sagas.id'], name=op.f('fk_saga_steps_saga_id_sagas'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('saga_id', 'step', name=op.f('pk_saga_steps'))
    )


def downgrade() -> None:
    op.drop_table('saga_steps')
    op.drop_index('ix_outbox_created_at', table_name='outbox')
    op.drop_table('outbox')
    op.drop_index('ix_sagas_running_deadline', table_name='sagas', postgresql_where=sa.text("state = 'RUNNING'"))
    op.drop_table('sagas')
    op.drop_table('order_lines')
    op.drop_table('order_events')
    op.drop_table('idempotency_keys')
    op.drop_index('ix_orders_customer_created', table_name='orders')
    op.drop_table('orders')
    op.drop_table('products')
    op.drop_table('customers')
