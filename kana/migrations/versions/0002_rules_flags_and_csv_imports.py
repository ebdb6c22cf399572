"""rules, flags and csv imports

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 01:34:07.700291
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table('csv_imports',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('workspace_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('filename', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('processed', sa.Integer(), nullable=False),
    sa.Column('created', sa.Integer(), nullable=False),
    sa.Column('updated', sa.Integer(), nullable=False),
    sa.Column('merged', sa.Integer(), nullable=False),
    sa.Column('unchanged', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('csv_imports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_csv_imports_workspace_id'), ['workspace_id'], unique=False)

    op.create_table('flag_refreshes',
    sa.Column('workspace_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('refreshed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('missing_billing_id', sa.Integer(), nullable=False),
    sa.Column('duplicate_email', sa.Integer(), nullable=False),
    sa.Column('duplicate_groups', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], ),
    sa.PrimaryKeyConstraint('workspace_id')
    )
    op.create_table('rules',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('workspace_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('feature_id', sa.String(length=100), nullable=False),
    sa.Column('event', sa.Text(), nullable=False),
    sa.Column('type', sa.String(length=20), nullable=True),
    sa.Column('conditions', sa.JSON(), nullable=False),
    sa.Column('delta_property', sa.Text(), nullable=True),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.create_index('ix_rules_workspace_priority', ['workspace_id', 'priority', 'id'], unique=False)

    op.create_table('user_flags',
    sa.Column('workspace_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('flag', sa.String(length=30), nullable=False),
    sa.Column('kana_id', sa.BigInteger(), nullable=False),
    sa.Column('email_key', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], ),
    sa.PrimaryKeyConstraint('workspace_id', 'flag', 'kana_id')
    )
    with op.batch_alter_table('user_flags', schema=None) as batch_op:
        batch_op.create_index('ix_user_flags_email', ['workspace_id', 'flag', 'email_key'], unique=False)

    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.alter_column('delta',
               existing_type=sa.NUMERIC(precision=28, scale=9),
               type_=sa.Numeric(28, 9),
               existing_nullable=False)




def downgrade() -> None:

    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.alter_column('delta',
               existing_type=sa.Numeric(28, 9),
               type_=sa.NUMERIC(precision=28, scale=9),
               existing_nullable=False)

    with op.batch_alter_table('user_flags', schema=None) as batch_op:
        batch_op.drop_index('ix_user_flags_email')

    op.drop_table('user_flags')
    with op.batch_alter_table('rules', schema=None) as batch_op:
        batch_op.drop_index('ix_rules_workspace_priority')

    op.drop_table('rules')
    op.drop_table('flag_refreshes')
    with op.batch_alter_table('csv_imports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_csv_imports_workspace_id'))

    op.drop_table('csv_imports')

