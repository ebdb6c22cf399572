"""Operator merges and deletes of users (SPEC §4.3, §4.5): audited, with who did it and from where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kana.db import SessionLocal
from kana.domain import identity, ids
from kana.errors import KanaError, NotFound
from kana.models import Audit, User
from kana.serializers import user_json


@dataclass(frozen=True)
class Merged:
    user: dict[str, Any]  # the survivor, with its aliases
    audit_id: int | None


def selected(session: Session, workspace_id: int, kana_ids: list[int]) -> list[User]:
    """The users with these kana_ids, oldest first; NotFound names the missing ones."""
    # An id beyond BIGINT is simply not there (and must not reach the database).
    found = list(session.scalars(
        select(User).where(User.workspace_id == workspace_id,
                           User.kana_id.in_([i for i in kana_ids if ids.in_id_range(i)]))
        .order_by(User.created_at, User.kana_id)))
    missing = sorted(set(kana_ids) - {u.kana_id for u in found})
    if missing:
        raise NotFound(f"No user with kana_id {', '.join(map(str, missing))} in this workspace.",
                       {"kana_ids": [f"Unknown kana_id {m}." for m in missing]})
    return found


def merge(workspace_id: int, kana_ids: list[int], *, trigger: str, actor: str) -> Merged:
    """Merge the users into the one created first."""
    distinct = list(dict.fromkeys(kana_ids))
    if len(distinct) < 2:
        raise KanaError("Invalid request. kana_ids: Needs at least two distinct kana_ids.",
                        {"kana_ids": ["Needs at least two distinct kana_ids."]})
    with SessionLocal.begin() as s:
        survivor = identity.merge(s, workspace_id, selected(s, workspace_id, distinct), trigger=trigger, actor=actor)
        body = user_json(survivor, identity.aliases_of(s, workspace_id, survivor.kana_id))
        audit_id = s.scalar(select(Audit.id).where(Audit.workspace_id == workspace_id, Audit.action == "merge",
                                                   Audit.survivor_kana_id == survivor.kana_id)
                            .order_by(Audit.id.desc()).limit(1))
    return Merged(body, audit_id)


def delete(workspace_id: int, kana_ids: list[int], *, trigger: str, actor: str) -> int:
    """Delete the users with their events, usage and aliases; how many were deleted."""
    distinct = list(dict.fromkeys(kana_ids))
    with SessionLocal.begin() as s:
        selected(s, workspace_id, distinct)
        return identity.delete_users(s, workspace_id, distinct, trigger=trigger, actor=actor)
