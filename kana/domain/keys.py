"""Workspaces and their API keys (stored hashed, scoped, revocable)."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import asdict, dataclass

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.orm import Session

from kana.models import ApiKey, Workspace, utcnow

log = logging.getLogger(__name__)

SCOPES = ("ingest", "admin")
# A key's record in Redis (below) outlives its last database lookup this long.
RECORD_TTL = 7 * 24 * 3600
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


def revoke_key(session: Session, workspace_id: int, key_id: int, redis: Redis | None = None) -> bool:
    """Revoke a key; with ``redis``, its Redis record (see ``remember``) is removed at once."""
    row = session.scalar(select(ApiKey).where(ApiKey.workspace_id == workspace_id, ApiKey.id == key_id))
    if row is None:
        return False
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    if redis is not None:
        # Before the commit, so a failure errs on the side of refusing the key.
        try:
            remember(redis, row.key_hash, None)
        except (RedisError, OSError) as exc:
            # The next database lookup of the key removes its record anyway.
            log.warning("could not remove the Redis record of key %s: %s", key_id, exc)
    return True


def list_keys(session: Session, workspace_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.workspace_id == workspace_id).order_by(ApiKey.id)))


def lookup(session: Session, key: str) -> Principal | None:
    """The principal for a clear-text key, or None when unknown or revoked."""
    return lookup_hash(session, hash_key(key))[1]


def lookup_hash(session: Session, key_hash: str) -> tuple[bool, Principal | None]:
    """(known, principal) for a key's hash: unknown keys are (False, None), revoked ones (True, None)."""
    row = session.execute(
        select(ApiKey, Workspace.billing_provider)
        .join(Workspace, Workspace.id == ApiKey.workspace_id)
        .where(ApiKey.key_hash == key_hash)
    ).first()
    if row is None:
        return False, None
    if row[0].revoked_at is not None:
        return True, None
    return True, Principal(row[0].workspace_id, row[0].scope, row[0].id, row[1])


# -- records in Redis -----------------------------------------------------------------
# The receiver checks keys against the database, and keeps what it learnt in
# Redis, keyed by the key's hash: while the database is unreachable the record
# answers instead (SPEC §3: accepting a call never needs the database).


def record_key(key_hash: str) -> str:
    return f"kana:apikey:{key_hash}"


def remember(redis: Redis, key_hash: str, principal: Principal | None) -> None:
    """Record a verified key's principal; None (revoked) removes the record. Unknown keys get none."""
    if principal is None:
        redis.delete(record_key(key_hash))
    else:
        redis.set(record_key(key_hash), json.dumps(asdict(principal)), ex=RECORD_TTL)


def recall(redis: Redis, key_hash: str) -> Principal | None:
    """The principal recorded for a key's hash, if any."""
    raw = redis.get(record_key(key_hash))
    return None if raw is None else Principal(**json.loads(raw))
