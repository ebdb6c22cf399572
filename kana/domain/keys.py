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

SCOPES = ("ingest", "check", "admin")
# Every key this installation issues starts with it (``kana_i_…`` ingest, ``kana_a_…`` admin).
KEY_PREFIX = "kana_"
# A record in Redis (below) outlives its last database lookup this long.
RECORD_TTL = 7 * 24 * 3600
BILLING_PROVIDERS = ("stripe", "chargebee")


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a workspace and the key's scope (key_id None: a signed /segment request)."""

    workspace_id: int
    scope: str
    key_id: int | None
    billing_provider: str | None
    # The workspace settings the receiver applies to each call it accepts.
    keep_ip: bool = False


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
    key = f"{KEY_PREFIX}{scope[0]}_{secrets.token_urlsafe(32)}"
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
        select(ApiKey, Workspace.billing_provider, Workspace.keep_ip)
        .join(Workspace, Workspace.id == ApiKey.workspace_id)
        .where(ApiKey.key_hash == key_hash)
    ).first()
    if row is None:
        return False, None
    if row[0].revoked_at is not None:
        return True, None
    return True, Principal(row[0].workspace_id, row[0].scope, row[0].id, row[1], bool(row[2]))


@dataclass(frozen=True)
class Signer:
    """A workspace's Segment shared secret (None: not set) and the principal its signed requests act as."""

    secret: str | None
    principal: Principal

    def as_dict(self) -> dict:
        return {"secret": self.secret, "principal": asdict(self.principal)}

    @classmethod
    def from_dict(cls, data: dict) -> Signer:
        return cls(data["secret"], Principal(**data["principal"]))


def signer(session: Session, workspace_id: int) -> tuple[bool, Signer | None]:
    """(known, signer) for verifying ``/segment/{workspace_id}``'s X-Signature; (False, None): no such workspace."""
    row = session.get(Workspace, workspace_id)
    if row is None:
        return False, None
    return True, Signer(row.segment_shared_secret, Principal(row.id, "ingest", None, row.billing_provider, row.keep_ip))


# -- records in Redis -----------------------------------------------------------------
# The receiver checks keys (and shared secrets) against the database, and keeps
# what it learnt in Redis: while the database is unreachable the record answers
# instead (SPEC §3: accepting a call never needs the database).


RECORD_PREFIX = "kana:auth:"


def record_key(key_hash: str) -> str:
    return f"{RECORD_PREFIX}key:{key_hash}"


def signer_record(workspace_id: int) -> str:
    return f"{RECORD_PREFIX}signer:{workspace_id}"


def write_record(redis: Redis, name: str, value: dict | None) -> None:
    """Record what the database said; None (revoked, gone) removes the record."""
    if value is None:
        redis.delete(name)
    else:
        redis.set(name, json.dumps(value), ex=RECORD_TTL)


def read_record(redis: Redis, name: str) -> dict | None:
    raw = redis.get(name)
    return None if raw is None else json.loads(raw)


def remember(redis: Redis, key_hash: str, principal: Principal | None) -> None:
    """Record a verified key's principal; None (revoked) removes the record. Unknown keys get none."""
    write_record(redis, record_key(key_hash), None if principal is None else asdict(principal))


def recall(redis: Redis, key_hash: str) -> Principal | None:
    """The principal recorded for a key's hash, if any."""
    data = read_record(redis, record_key(key_hash))
    return None if data is None else Principal(**data)
