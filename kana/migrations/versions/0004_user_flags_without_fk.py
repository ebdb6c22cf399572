"""user_flags: no foreign key to workspaces

The flag table is derived data, rebuilt by every refresh (SPEC §6). A foreign
key check per inserted row cost 3.7 s of a refresh that flags a million users
on PostgreSQL; the workspace id is still part of the primary key and of every
query, and workspaces are never deleted.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 11:10:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite keeps the constraint unnamed; batch mode names it by this convention to drop it.
NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint('user_flags_workspace_id_fkey', 'user_flags', type_='foreignkey')
    else:
        with op.batch_alter_table('user_flags', naming_convention=NAMING) as batch_op:
            batch_op.drop_constraint('fk_user_flags_workspace_id', type_='foreignkey')


def downgrade() -> None:
    with op.batch_alter_table('user_flags', schema=None) as batch_op:
        batch_op.create_foreign_key('user_flags_workspace_id_fkey', 'workspaces', ['workspace_id'], ['id'])
