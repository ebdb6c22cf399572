"""dashboard sessions (revocable logins); installation operators

Logging out ends a session on the server: each login is a row the signed
cookie names, deleted by logout, "log out everywhere" and a password change.
``operator`` marks the dashboard admins who may open /rq (every workspace's jobs).

Revision ID: 0007
Revises: 0004
Create Date: 2026-11-30 06:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('dashboard_sessions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('admin_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('nonce', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['admin_id'], ['dashboard_admins.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dashboard_sessions_admin_id'), ['admin_id'], unique=False)

    with op.batch_alter_table('dashboard_admins', schema=None) as batch_op:
        batch_op.add_column(sa.Column('operator', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('dashboard_admins', schema=None) as batch_op:
        batch_op.drop_column('operator')

    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dashboard_sessions_admin_id'))

    op.drop_table('dashboard_sessions')
