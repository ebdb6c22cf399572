"""Usage queries over the ledger (SPEC §7): totals, windowed series, top users.

Everything is aggregated in SQL; Python only walks the (bounded) list of time
buckets to zero-fill a series. Ranges are half-open: ``start <= at < end``.
"""

from __future__ import annotations

import decimal
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Select, func, literal_column, select
from sqlalchemy.orm import Session

from kana.models import Usage, User

WINDOWS = ("hour", "day", "month")
# A series longer than this is a mistake (e.g. hourly over years), not a chart.
MAX_BUCKETS = 10_000
_NINE_PLACES = Decimal("1e-9")
_SQLITE_FORMATS = {
    "hour": "%Y-%m-%d %H:00:00",
    "day": "%Y-%m-%d 00:00:00",
    "month": "%Y-%m-01 00:00:00",
}


def to_decimal(value: Any) -> Decimal:
    """A summed amount as an exact Decimal.

    SQLite sums REALs, so 0.1 + 0.2 comes back as 0.30000000000000004; the
    ledger's precision is 9 decimal places (Numeric(28, 9)), so round to that.
    """
    if value is None:
        return Decimal(0)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        number = Decimal(str(value)).quantize(_NINE_PLACES)
    return number.normalize() if number else Decimal(0)


def _filtered(stmt: Select, workspace_id: int, kana_id: int | None, feature_id: str,
              start: datetime | None, end: datetime | None) -> Select:
    stmt = stmt.where(Usage.workspace_id == workspace_id, Usage.feature_id == feature_id)
    if kana_id is not None:
        stmt = stmt.where(Usage.kana_id == kana_id)
    if start is not None:
        stmt = stmt.where(Usage.at >= start)
    if end is not None:
        stmt = stmt.where(Usage.at < end)
    return stmt


def total(
    session: Session,
    workspace_id: int,
    kana_id: int | None,
    feature_id: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Decimal:
    """Sum of usage of a feature in ``[start, end)``; ``kana_id=None`` sums all users."""
    stmt = _filtered(select(func.sum(Usage.delta)), workspace_id, kana_id, feature_id, start, end)
    return to_decimal(session.scalar(stmt))


def span(
    session: Session,
    workspace_id: int,
    kana_id: int | None,
    feature_id: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> tuple[datetime | None, datetime | None]:
    """When the first and the last usage in ``[start, end)`` happened (None, None without any)."""
    stmt = _filtered(select(func.min(Usage.at), func.max(Usage.at)), workspace_id, kana_id, feature_id, start, end)
    first, last = session.execute(stmt).one()
    return (_as_utc(first) if first is not None else None, _as_utc(last) if last is not None else None)


def _bucket(session: Session, window: str) -> ColumnElement:
    """The start of an ``at``'s UTC hour/day/month, in the dialect's own SQL."""
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}")
    if session.get_bind().dialect.name == "postgresql":
        # date_trunc on a timestamptz truncates in the session's time zone;
        # converting to UTC first makes days and months UTC days and months.
        # Literals, not bound parameters: PostgreSQL only sees the GROUP BY
        # expression as the selected one when the SQL text is identical.
        return func.date_trunc(literal_column(f"'{window}'"), func.timezone(literal_column("'UTC'"), Usage.at))
    # SQLite stores the UTC datetime as text: format it to the bucket's start.
    return func.strftime(_SQLITE_FORMATS[window], Usage.at)


def _as_utc(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def floor(moment: datetime, window: str) -> datetime:
    moment = _as_utc(moment)
    if window == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    if window == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "month":
        return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"window must be one of {', '.join(WINDOWS)}")


def step(moment: datetime, window: str) -> datetime:
    if window == "hour":
        return moment + timedelta(hours=1)
    if window == "day":
        return moment + timedelta(days=1)
    if moment.month == 12:
        return moment.replace(year=moment.year + 1, month=1)
    return moment.replace(month=moment.month + 1)


def buckets(start: datetime, end: datetime, window: str) -> list[datetime]:
    """Bucket starts covering ``[start, end)``; ValueError past ``MAX_BUCKETS``."""
    out: list[datetime] = []
    moment, end = floor(start, window), _as_utc(end)
    while moment < end:
        out.append(moment)
        if len(out) > MAX_BUCKETS:
            raise ValueError(f"a {window} series over this range has more than {MAX_BUCKETS} points")
        moment = step(moment, window)
    return out


def series(
    session: Session,
    workspace_id: int,
    kana_id: int | None,
    feature_id: str,
    start: datetime,
    end: datetime,
    window: str,
) -> list[dict[str, Any]]:
    """Usage per hour/day/month in ``[start, end)``: ``[{"start": iso, "total": Decimal}]``, zero-filled."""
    starts = buckets(start, end, window)
    bucket = _bucket(session, window).label("bucket")
    stmt = _filtered(
        select(bucket, func.sum(Usage.delta)), workspace_id, kana_id, feature_id, _as_utc(start), _as_utc(end)
    ).group_by(bucket)
    sums = {_as_utc(b): to_decimal(v) for b, v in session.execute(stmt)}
    return [{"start": b.isoformat(), "total": sums.get(b, Decimal(0))} for b in starts]


def top_users(
    session: Session,
    workspace_id: int,
    feature_id: str,
    start: datetime | None,
    end: datetime | None,
    limit: int,
) -> list[dict[str, Any]]:
    """The users with the most usage of a feature in ``[start, end)``, largest first."""
    summed = func.sum(Usage.delta).label("total")
    stmt = _filtered(
        select(Usage.kana_id, User.user_id, summed).join(User, User.kana_id == Usage.kana_id),
        workspace_id, None, feature_id, start, end,
    )
    stmt = stmt.group_by(Usage.kana_id, User.user_id).order_by(summed.desc(), Usage.kana_id).limit(limit)
    return [
        {"kana_id": kana_id, "user_id": user_id, "total": to_decimal(value)}
        for kana_id, user_id, value in session.execute(stmt)
    ]
