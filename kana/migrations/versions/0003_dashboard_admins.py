"""dashboard admins; events by arrival time

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 02:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('dashboard_admins',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('workspace_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('password_hash', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['workspace_id'], ['workspaces.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('workspace_id', 'email', name='uq_dashboard_admins_workspace_email')
    )
    with op.batch_alter_table('dashboard_admins', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dashboard_admins_workspace_id'), ['workspace_id'], unique=False)

    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_workspace_received', ['workspace_id', 'received_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_workspace_received')

    with op.batch_alter_table('dashboard_admins', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dashboard_admins_workspace_id'))

    op.drop_table('dashboard_admins')
