"""events keep context and Segment's timestamps; users keep locale/timezone; workspaces get
the Segment shared secret and the keep_ip setting

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.add_column(sa.Column('segment_shared_secret', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('keep_ip', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('locale', sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column('timezone', sa.String(length=100), nullable=True))
    # Nullable, no default: adding them rewrites no existing row on PostgreSQL.
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('context', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('timestamps', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('timestamps')
        batch_op.drop_column('context')
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.drop_column('timezone')
        batch_op.drop_column('locale')
    with op.batch_alter_table('workspaces', schema=None) as batch_op:
        batch_op.drop_column('keep_ip')
        batch_op.drop_column('segment_shared_secret')
