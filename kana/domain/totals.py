"""Running usage totals: the ledger's sums per user, feature and calendar-UTC day and month.

Entitlement checks and alerts need "this user's usage of this feature in the
current period" for every pair a chunk touches. Summing the ledger for that
walks every usage row of the period (thousands for a busy user, per chunk), so
the sums are kept instead, in ``usage_totals``, by whatever changes ``usage``, in
the same transaction:

* new usage rows (a chunk, reprocessing) are added to their day and month rows
  (``add``, one accumulating upsert; the rows passed must be the ones actually
  inserted, so a redelivered or retried chunk adds nothing);
* a merge moves the merged-away users' totals to the survivor (``move``), like
  their usage rows;
* deleting users or a feature's usage deletes their totals (``drop``).

So a total is exactly the ledger's sum, transactionally; ``rebuild`` recomputes
them from the ledger (the migration that created the table, an operator repair).
Lifetime totals add up a pair's month rows (a dozen a year).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import ScalarSelect, case, delete, func, literal, or_, select
from sqlalchemy.orm import Session

from kana import db
from kana.domain import ledger
from kana.models import Usage, UsageTotal

TOTALS = UsageTotal.__table__

# ``add`` inside a PostgreSQL statement, for usage rows another part of it inserted
# (``rows``: a CTE of kana_id, feature_id, at, delta; ``:ws`` the workspace): the
# same calendar-UTC buckets as ``buckets``, summed and upserted in key order
# without a round trip through Python.
ADD_PG = """
    INSERT INTO usage_totals (workspace_id, kana_id, feature_id, period, start, total)
    SELECT :ws, r.kana_id, r.feature_id, p.period, date_trunc(p.period, r.at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
           sum(r.delta)
    FROM {rows} AS r CROSS JOIN (VALUES ('day'), ('month')) AS p (period)
    GROUP BY 2, 3, 4, 5
    ORDER BY 2, 3, 4, 5
    ON CONFLICT (workspace_id, kana_id, feature_id, period, start)
    DO UPDATE SET total = usage_totals.total + EXCLUDED.total"""
KEY = ["workspace_id", "kana_id", "feature_id", "period", "start"]
PERIODS = ("day", "month")

# (kana_id, feature_id, at, delta) of a usage row
Row = tuple[int, str, datetime, Decimal]


def buckets(workspace_id: int, rows: Iterable[Row]) -> list[dict]:
    """The totals rows that ``rows`` add up to: one per (user, feature, period, start), in key order."""
    sums: dict[tuple, Decimal] = defaultdict(Decimal)
    for kana_id, feature_id, at, delta in rows:
        for period in PERIODS:
            sums[(kana_id, feature_id, period, ledger.floor(at, period))] += Decimal(delta)
    # Key order: two transactions upserting overlapping rows lock them in the same order.
    return [{"workspace_id": workspace_id, "kana_id": k, "feature_id": f, "period": p, "start": s, "total": t}
            for (k, f, p, s), t in sorted(sums.items())]


def add(session: Session, workspace_id: int, rows: Iterable[Row]) -> None:
    """Add newly inserted usage rows to their totals (in the transaction that inserted them)."""
    totals = buckets(workspace_id, rows)
    if totals:
        db.insert_rows(session, TOTALS, totals, add_on_conflict=(KEY, ["total"]))


def move(session: Session, workspace_id: int, from_ids: list[int], to_id: int) -> None:
    """A merge moved the usage of ``from_ids`` to ``to_id``: move their totals with it."""
    moved = session.execute(
        delete(UsageTotal)
        .where(UsageTotal.workspace_id == workspace_id, UsageTotal.kana_id.in_(from_ids))
        .returning(UsageTotal.feature_id, UsageTotal.period, UsageTotal.start, UsageTotal.total)
    ).all()
    sums: dict[tuple, Decimal] = defaultdict(Decimal)
    for feature_id, period, start, total in moved:
        sums[(feature_id, period, start)] += total
    if sums:
        db.insert_rows(session, TOTALS, [
            {"workspace_id": workspace_id, "kana_id": to_id, "feature_id": f, "period": p, "start": s, "total": t}
            for (f, p, s), t in sorted(sums.items())], add_on_conflict=(KEY, ["total"]))


def drop(session: Session, workspace_id: int, *, kana_ids: list[int] | None = None,
         feature_id: str | None = None) -> None:
    """The usage of these users, or of this feature, was deleted: so are its totals."""
    stmt = delete(UsageTotal).where(UsageTotal.workspace_id == workspace_id)
    if kana_ids is not None:
        stmt = stmt.where(UsageTotal.kana_id.in_(kana_ids))
    if feature_id is not None:
        stmt = stmt.where(UsageTotal.feature_id == feature_id)
    session.execute(stmt.execution_options(synchronize_session=False))


def rebuild(session: Session, workspace_id: int, *, batch: int = 10_000) -> int:
    """Recompute a workspace's totals from the ledger; returns the usage rows summed.

    Reads the usage rows in id order, ``batch`` at a time, so memory stays bounded.
    """
    drop(session, workspace_id)
    summed, after = 0, 0
    while True:
        rows = session.execute(
            select(Usage.id, Usage.kana_id, Usage.feature_id, Usage.at, Usage.delta)
            .where(Usage.workspace_id == workspace_id, Usage.id > after)
            .order_by(Usage.id).limit(batch)
        ).all()
        if not rows:
            return summed
        add(session, workspace_id, ((k, f, at, d) for _i, k, f, at, d in rows))
        summed += len(rows)
        after = rows[-1][0]


def total(session: Session, workspace_id: int, kana_id: int, feature_id: str, period: str,
          start: datetime | None) -> Decimal:
    """A pair's usage in the ``period`` (day, month or none: lifetime) starting at ``start``."""
    return ledger.to_decimal(session.scalar(select(current(workspace_id, kana_id, feature_id, literal(period),
                                                            start, start))))


def current(workspace_id: int, kana_id: Any, feature_id: Any, period: Any, day: datetime | None,
            month: datetime | None) -> ScalarSelect:
    """A pair's total in the current ``period`` (day, month or none) as a scalar subquery whose
    arguments may be columns of the enclosing query (``day``/``month``: the current periods' starts).

    Correlated, so for each outer row it is a lookup by the table's primary key
    whatever the statistics say (an IN list lets a planner that thinks the table
    is tiny scan all of it).
    """
    return select(func.sum(UsageTotal.total)).where(
        UsageTotal.workspace_id == workspace_id, UsageTotal.kana_id == kana_id, UsageTotal.feature_id == feature_id,
        UsageTotal.period == case((period == "day", "day"), else_="month"),
        or_(period == "none", UsageTotal.start == case((period == "day", literal(day, UsageTotal.start.type)),
                                                       else_=literal(month, UsageTotal.start.type))),
    ).scalar_subquery()
