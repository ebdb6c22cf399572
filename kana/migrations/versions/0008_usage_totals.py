"""usage totals per user, feature and calendar-UTC day and month, filled from the ledger

Entitlement checks and alerts read these instead of summing the period's usage
rows per chunk (see kana/domain/totals.py). The backfill sums the existing
ledger; the application keeps them from then on in the transactions that
change usage.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 08:40:00.000000
"""

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')

# The same buckets as kana.domain.totals: calendar UTC, lifetime from the months.
_BACKFILL_PG = """
INSERT INTO usage_totals (workspace_id, kana_id, feature_id, period, start, total)
SELECT workspace_id, kana_id, feature_id, p.period,
       date_trunc(p.period, at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', sum(delta)
FROM usage CROSS JOIN (VALUES ('day'), ('month')) AS p (period)
GROUP BY 1, 2, 3, 4, 5
"""


def upgrade() -> None:
    table = op.create_table('usage_totals',
    sa.Column('workspace_id', BigId, nullable=False),
    sa.Column('kana_id', BigId, nullable=False),
    sa.Column('feature_id', sa.String(length=100), nullable=False),
    sa.Column('period', sa.String(length=5), nullable=False),
    sa.Column('start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('total', sa.Numeric(28, 9), nullable=True),
    sa.PrimaryKeyConstraint('workspace_id', 'kana_id', 'feature_id', 'period', 'start')
    )
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        # Each chunk rewrites today's and this month's rows of the users it touched:
        # room on the page lets those updates stay HOT (no index entry per update).
        op.execute("ALTER TABLE usage_totals SET (fillfactor = 70)")
        op.execute(_BACKFILL_PG)
        return
    # SQLite (the embedded default, small): sum in Python, with the application's
    # stored form of a UTC datetime.
    sums: dict[tuple, Decimal] = defaultdict(Decimal)
    for ws, kana_id, feature_id, at, delta in bind.execute(
            sa.text("SELECT workspace_id, kana_id, feature_id, at, delta FROM usage")):
        moment = datetime.fromisoformat(at) if isinstance(at, str) else at
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
        day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        for period, start in (('day', day), ('month', day.replace(day=1))):
            sums[(ws, kana_id, feature_id, period, start)] += Decimal(str(delta))
    if sums:
        op.bulk_insert(table, [
            {'workspace_id': ws, 'kana_id': k, 'feature_id': f, 'period': p, 'start': s, 'total': float(t)}
            for (ws, k, f, p, s), t in sums.items()])


def downgrade() -> None:
    op.drop_table('usage_totals')
