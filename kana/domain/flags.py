"""Flags (SPEC §6): users without a billing id, and users sharing an email.

``refresh`` rebuilds one workspace's ``user_flags`` rows with set-based SQL in
the caller's transaction, so readers see the old set or the new one, never a
mix. It writes only the difference (stale rows out, new rows in) rather than
deleting and re-inserting everything: on a million users whose flags barely
change between two runs that is a few index scans instead of two million row
writes (and their WAL and bloat) every five minutes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, delete, exists, func, insert, literal, null, or_, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from kana.models import FlagRefresh, User, UserFlag, Workspace, utcnow

MISSING_BILLING_ID = "missing_billing_id"
DUPLICATE_EMAIL = "duplicate_email"
FLAGS = (MISSING_BILLING_ID, DUPLICATE_EMAIL)
# The users list and the CSV export also accept "any": flagged for either reason.
ANY = "any"
GROUPS_LIMIT = 50
MAX_GROUPS_LIMIT = 500


def check_flag(flag: str) -> str:
    if flag not in FLAGS and flag != ANY:
        raise ValueError(f"unknown flag {flag!r}: use {', '.join(FLAGS)} or {ANY}")
    return flag


def _duplicate_keys(workspace_id: int) -> Select:
    """Email keys held by two or more users of the workspace (index-only on ix_users_workspace_email)."""
    return (
        select(User.email_key)
        .where(User.workspace_id == workspace_id, User.email_key.is_not(None), User.email_key != "")
        .group_by(User.email_key)
        .having(func.count() > 1)
    )


def _missing_billing(workspace_id: int) -> Any:
    return and_(User.workspace_id == workspace_id, or_(User.billing_id.is_(None), User.billing_id == ""))


def _lock(session: Session, workspace_id: int, now: datetime) -> None:
    """Upsert the workspace's FlagRefresh row first: its row lock serialises two refreshes.

    Without it, two concurrent refreshes of one workspace would both insert the
    same new flag rows and one would fail on the primary key.
    """
    values = {"workspace_id": workspace_id, "refreshed_at": now, "missing_billing_id": 0,
              "duplicate_email": 0, "duplicate_groups": 0}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert
    else:  # pragma: no cover - the project supports these two
        raise RuntimeError(f"unsupported database {dialect}")
    stmt = upsert(FlagRefresh).values(**values)
    session.execute(stmt.on_conflict_do_update(index_elements=[FlagRefresh.workspace_id],
                                               set_={"refreshed_at": now}))


def refresh(session: Session, workspace_id: int) -> dict[str, Any]:
    """Rebuild the workspace's flags in the caller's transaction; returns the new counts."""
    now = utcnow()
    _lock(session, workspace_id, now)
    flag = UserFlag.__table__.c
    mine = and_(flag.workspace_id == workspace_id)

    # missing_billing_id: drop users who have one now (or are gone), add the new ones.
    session.execute(
        delete(UserFlag.__table__).where(
            mine, flag.flag == MISSING_BILLING_ID,
            ~exists().where(User.kana_id == flag.kana_id, _missing_billing(workspace_id)),
        )
    )
    session.execute(
        insert(UserFlag.__table__).from_select(
            ["workspace_id", "flag", "kana_id", "email_key"],
            select(literal(workspace_id), literal(MISSING_BILLING_ID), User.kana_id, null())
            .where(_missing_billing(workspace_id))
            .where(~exists().where(mine, flag.flag == MISSING_BILLING_ID, flag.kana_id == User.kana_id)),
        )
    )

    # duplicate_email: a row is stale when its user is gone, changed email, or
    # the email is no longer shared; after that, every remaining row is right.
    # (NOT EXISTS, not NOT IN: PostgreSQL plans NOT IN over a large subquery as
    # a re-scan per row once its hash wouldn't fit work_mem.)
    other = aliased(User)
    session.execute(
        delete(UserFlag.__table__).where(
            mine, flag.flag == DUPLICATE_EMAIL,
            ~exists().where(
                User.kana_id == flag.kana_id, User.workspace_id == workspace_id, User.email_key == flag.email_key,
                exists().where(other.workspace_id == workspace_id, other.email_key == User.email_key,
                               other.kana_id != User.kana_id),
            ),
        )
    )
    dup_keys = _duplicate_keys(workspace_id)
    session.execute(
        insert(UserFlag.__table__).from_select(
            ["workspace_id", "flag", "kana_id", "email_key"],
            select(literal(workspace_id), literal(DUPLICATE_EMAIL), User.kana_id, User.email_key)
            .where(User.workspace_id == workspace_id, User.email_key.in_(dup_keys.scalar_subquery()))
            .where(~exists().where(mine, flag.flag == DUPLICATE_EMAIL, flag.kana_id == User.kana_id)),
        )
    )

    counts: dict[str, int] = {
        name: n
        for name, n in session.execute(
            select(UserFlag.flag, func.count()).where(UserFlag.workspace_id == workspace_id).group_by(UserFlag.flag)
        )
    }
    groups = session.scalar(
        select(func.count(func.distinct(UserFlag.email_key)))
        .where(UserFlag.workspace_id == workspace_id, UserFlag.flag == DUPLICATE_EMAIL)
    ) or 0
    row = session.get(FlagRefresh, workspace_id, populate_existing=True)
    assert row is not None  # upserted by _lock in this transaction
    row.refreshed_at = now
    row.missing_billing_id = counts.get(MISSING_BILLING_ID, 0)
    row.duplicate_email = counts.get(DUPLICATE_EMAIL, 0)
    row.duplicate_groups = groups
    session.flush()
    return {
        "workspace_id": workspace_id,
        MISSING_BILLING_ID: row.missing_billing_id,
        DUPLICATE_EMAIL: row.duplicate_email,
        "duplicate_groups": groups,
        "refreshed_at": now.isoformat(),
    }


def refresh_all(session_factory: sessionmaker) -> dict[int, dict[str, Any]]:
    """Refresh every workspace, each in its own short transaction."""
    with session_factory() as session:
        workspace_ids = list(session.scalars(select(Workspace.id).order_by(Workspace.id)))
    results = {}
    for workspace_id in workspace_ids:
        with session_factory.begin() as session:
            results[workspace_id] = refresh(session, workspace_id)
    return results


def flagged_user_ids_query(workspace_id: int, flag: str) -> Select:
    """``SELECT kana_id`` of the users flagged ``flag`` (or ``any``) at the last refresh.

    For ``User.kana_id.in_(...)`` filters (users list, CSV export). Users merged
    away or deleted since the refresh simply don't match any more.
    """
    check_flag(flag)
    stmt = select(UserFlag.kana_id).where(UserFlag.workspace_id == workspace_id)
    if flag != ANY:
        stmt = stmt.where(UserFlag.flag == flag)
    return stmt


def summary(
    session: Session, workspace_id: int, *, groups_limit: int = GROUPS_LIMIT, after: str | None = None
) -> dict[str, Any]:
    """The ``GET /api/v1/flags`` body (SPEC §10), as of the last refresh.

    Groups are ordered by email and paginated: ``after`` is the last email of the
    previous page, returned as ``duplicate_email.next_cursor``. Members merged
    away or deleted since the refresh are left out (a group left with one
    member is too); the counts are those of the refresh.
    """
    groups_limit = max(1, min(groups_limit, MAX_GROUPS_LIMIT))
    row = session.get(FlagRefresh, workspace_id)
    member = (
        select(UserFlag.email_key, UserFlag.kana_id)
        .join(User, and_(User.kana_id == UserFlag.kana_id, User.workspace_id == workspace_id))
        .where(UserFlag.workspace_id == workspace_id, UserFlag.flag == DUPLICATE_EMAIL)
    )
    keys_stmt = (
        select(UserFlag.email_key)
        .join(User, and_(User.kana_id == UserFlag.kana_id, User.workspace_id == workspace_id))
        .where(UserFlag.workspace_id == workspace_id, UserFlag.flag == DUPLICATE_EMAIL)
        .group_by(UserFlag.email_key)
        .having(func.count() > 1)
        .order_by(UserFlag.email_key)
        .limit(groups_limit + 1)
    )
    if after:
        keys_stmt = keys_stmt.where(UserFlag.email_key > after)
    keys = list(session.scalars(keys_stmt))
    next_cursor = None
    if len(keys) > groups_limit:
        keys = keys[:groups_limit]
        next_cursor = keys[-1]
    members: dict[str, list[int]] = {k: [] for k in keys}
    if keys:
        for key, kana_id in session.execute(
            member.where(UserFlag.email_key.in_(keys)).order_by(UserFlag.email_key, UserFlag.kana_id)
        ):
            members[key].append(kana_id)
    return {
        MISSING_BILLING_ID: {"count": row.missing_billing_id if row else 0},
        DUPLICATE_EMAIL: {
            "count": row.duplicate_email if row else 0,
            "groups": [{"email": k, "kana_ids": members[k]} for k in keys],
            "groups_total": row.duplicate_groups if row else 0,
            "next_cursor": next_cursor,
        },
        "refreshed_at": row.refreshed_at.isoformat() if row else None,
    }
