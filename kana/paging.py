"""Keyset pagination, for the API's cursors and the dashboard's "older" links alike.

A page is ``stmt`` ordered by a unique column and cut after the last key seen,
so page 20,000 costs what page 1 does (no OFFSET).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select
from sqlalchemy.orm import Session


def keyset(session: Session, stmt: Select, column: Any, *, after: int | None, limit: int,
           descending: bool = False) -> tuple[list[Any], int | None]:
    """One page of ``stmt`` after the key ``after`` (None: the first page), and the next page's ``after``."""
    if after is not None:
        stmt = stmt.where(column < after if descending else column > after)
    stmt = stmt.order_by(column.desc() if descending else column.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, getattr(rows[-1], column.key)
