"""plans, user plans, usage alerts and webhook deliveries (SPEC §11)

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-30 05:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('plans',
    sa.Column('workspace_id', BigId, nullable=False),
    sa.Column('id', sa.String(length=100), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], ),
    sa.PrimaryKeyConstraint('workspace_id', 'id')
    )
    op.create_table('plan_features',
    sa.Column('workspace_id', BigId, nullable=False),
    sa.Column('plan_id', sa.String(length=100), nullable=False),
    sa.Column('feature_id', sa.String(length=100), nullable=False),
    sa.Column('limit', sa.Numeric(28, 9), nullable=True),
    sa.Column('period', sa.String(length=10), nullable=False),
    sa.Column('overage', sa.Boolean(), nullable=False),
    sa.Column('thresholds', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('workspace_id', 'plan_id', 'feature_id')
    )
    op.create_index('ix_plan_features_feature', 'plan_features', ['workspace_id', 'feature_id'], unique=False)
    op.create_table('alerts',
    sa.Column('id', BigId, nullable=False),
    sa.Column('workspace_id', BigId, nullable=False),
    sa.Column('kana_id', sa.BigInteger(), nullable=False),
    sa.Column('feature_id', sa.String(length=100), nullable=False),
    sa.Column('threshold', sa.Integer(), nullable=False),
    sa.Column('period_start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('workspace_id', 'kana_id', 'feature_id', 'threshold', 'period_start',
                        name='uq_alerts_crossing')
    )
    op.create_table('webhook_deliveries',
    sa.Column('id', BigId, nullable=False),
    sa.Column('workspace_id', BigId, nullable=False),
    sa.Column('alert_id', sa.BigInteger(), nullable=True),
    sa.Column('type', sa.String(length=50), nullable=False),
    sa.Column('idempotency_key', sa.String(length=100), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('alert_id'),
    sa.UniqueConstraint('idempotency_key')
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['status', 'next_attempt_at'], unique=False)
    op.create_index('ix_webhook_deliveries_workspace', 'webhook_deliveries', ['workspace_id', 'id'], unique=False)
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan_id', sa.String(length=100), nullable=True))
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.add_column(sa.Column('webhook_url', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('webhook_secret', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.drop_column('webhook_secret')
        batch_op.drop_column('webhook_url')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('plan_id')
    op.drop_index('ix_webhook_deliveries_workspace', table_name='webhook_deliveries')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_table('alerts')
    op.drop_index('ix_plan_features_feature', table_name='plan_features')
    op.drop_table('plan_features')
    op.drop_table('plans')
