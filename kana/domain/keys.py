"""Workspaces and their API keys (stored hashed, scoped, revocable)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from kana.models import ApiKey, Workspace, utcnow

SCOPES = ("ingest", "check", "admin")
BILLING_PROVIDERS = ("stripe", "chargebee")


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a workspace and the key's scope."""

    workspace_id: int
    scope: str
    key_id: int
    billing_provider: str | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_workspace(session: Session, name: str, billing_provider: str | None = None) -> tuple[Workspace, str]:
    """Create a workspace and its first admin key; returns the key in clear, once."""
    if billing_provider is not None and billing_provider not in BILLING_PROVIDERS:
        raise ValueError(f"billing_provider must be one of {', '.join(BILLING_PROVIDERS)}")
    workspace = Workspace(name=name, billing_provider=billing_provider)
    session.add(workspace)
    session.flush()
    _, key = create_key(session, workspace.id, "admin", name="initial admin key")
    return workspace, key


def create_key(session: Session, workspace_id: int, scope: str, name: str | None = None) -> tuple[ApiKey, str]:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
    key = f"kana_{scope[0]}_{secrets.token_urlsafe(32)}"
    row = ApiKey(workspace_id=workspace_id, key_hash=hash_key(key), prefix=key[:12], scope=scope, name=name)
    session.add(row)
    session.flush()
    return row, key


def revoke_key(session: Session, workspace_id: int, key_id: int) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.workspace_id == workspace_id, ApiKey.id == key_id))
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return True


def list_keys(session: Session, workspace_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.workspace_id == workspace_id).order_by(ApiKey.id)))


def lookup(session: Session, key: str) -> Principal | None:
    """The principal for a clear-text key, or None when unknown or revoked."""
    row = session.execute(
        select(ApiKey, Workspace.billing_provider)
        .join(Workspace, Workspace.id == ApiKey.workspace_id)
        .where(ApiKey.key_hash == hash_key(key))
    ).first()
    if row is None or row[0].revoked_at is not None:
        return None
    return Principal(row[0].workspace_id, row[0].scope, row[0].id, row[1])
