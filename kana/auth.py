"""API key authentication for the receiver and the admin API.

The key may arrive as ``Authorization: Basic base64(key:)`` (Segment's
convention), ``Bearer key``, a bare ``key``, or ``writeKey`` in the JSON body.
Lookups are cached per process for ``settings.key_cache_ttl`` seconds so the
receiver does no database work per call; a revocation takes effect within that.
``/segment/{workspace_id}`` may instead be signed with the workspace's Segment
shared secret (``verify_signature``), looked up the same way. What the database
said is also recorded in Redis, which answers while the database is down.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from flask import g, request
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from kana import outages, runtime
from kana.db import SessionLocal, read_only
from kana.domain import keys
from kana.domain.keys import Principal
from kana.errors import ApiError

log = logging.getLogger(__name__)

# record name → (fresh until, value); kept past that as the last answer.
_cache: dict[str, tuple[float, Any]] = {}
# Which key scopes each surface takes: a check key (held by a customer's backend)
# answers entitlement checks and nothing else.
ALLOWED = {"ingest": ("ingest", "admin"), "check": ("check", "admin"), "admin": ("admin",)}
NEEDS = {"ingest": "sending calls needs an ingest or admin key",
         "check": "entitlement checks need a check or admin key",
         "admin": "the admin API needs an admin key"}
_cache_lock = threading.Lock()
_CACHE_MAX = 10_000


def key_from_header(header: str | None) -> str | None:
    if not header:
        return None
    header = header.strip()
    scheme, _, rest = header.partition(" ")
    rest = rest.strip()
    if scheme.lower() == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        # Segment sends "key:" (the key as user name, empty password).
        return decoded.split(":", 1)[0] or None
    if scheme.lower() == "bearer" and rest:
        return rest
    if not rest:
        return header  # a bare key
    return None


# While the database is unreachable, lookups stop trying it for this long
# after each failure (a down database can take seconds to refuse).
DATABASE_RETRY = 2.0
_database = outages.Outage("database (API key checks)", log)
_database_retry_at = 0.0


def cached_lookup(name: str, load: Callable[[Session], tuple[bool, Any]],
                  encode: Callable[[Any], dict], decode: Callable[[dict], Any]) -> Any:
    """What ``load(session)`` says about ``name`` (a Redis record name), without needing the database.

    The one lookup of the receiver's credentials (API keys, shared secrets).
    ``load`` returns ``(known, value)``. The database answers, cached per
    process for ``key_cache_ttl`` seconds (a revocation or settings change takes
    effect within that; the surfaces that change them also clear this cache),
    and what it said about a known name is recorded in Redis (a None value
    removes the record). While the database is unreachable the Redis record
    answers, else this process's last answer however old; with neither, the
    database error propagates (the receiver answers 503 and Segment retries).
    """
    global _database_retry_at
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(name)
    if hit is not None and hit[0] > now:
        return hit[1]
    rt = runtime.current()
    failure: Exception | None = None
    if now >= _database_retry_at:
        try:
            with read_only(SessionLocal()) as session:
                known, value = load(session)
        except (DBAPIError, PoolTimeout) as exc:
            failure = exc
            _database_retry_at = now + DATABASE_RETRY
            _database.down(exc)
        else:
            _database.up()
            _remember(name, value, now + rt.settings.key_cache_ttl)
            if known:
                try:
                    keys.write_record(rt.redis, name, None if value is None else encode(value))
                except (RedisError, OSError):
                    pass  # the receiver answers 503 for Redis itself; the record is rewritten next time
            return value
    try:
        recorded = keys.read_record(rt.redis, name)
    except (RedisError, OSError):
        recorded = None
    if recorded is not None:
        value = decode(recorded)
        _remember(name, value, now + rt.settings.key_cache_ttl)
        return value
    if hit is not None:
        return hit[1]
    if failure is None:
        # Between retries of a down database, without an answer for this name.
        raise DatabaseDown("the database is unreachable; retrying shortly")
    raise failure


class DatabaseDown(DBAPIError):
    """No answer for a lookup while the database is skipped; a ``DBAPIError`` like the failure itself."""

    def __init__(self, message: str) -> None:
        super().__init__(statement=None, params=None, orig=ConnectionError(message))


def _remember(name: str, value: Any, until: float) -> None:
    with _cache_lock:
        if len(_cache) > _CACHE_MAX:
            _cache.clear()
        _cache[name] = (until, value)


def principal_for(key: str) -> Principal | None:
    """The principal of a clear-text API key, or None when it is unknown or revoked."""
    digest = keys.hash_key(key)
    return cached_lookup(keys.record_key(digest), lambda session: keys.lookup_hash(session, digest),
                         asdict, lambda data: Principal(**data))


def signer_for(workspace_id: int) -> keys.Signer | None:
    """The workspace's Segment shared secret and principal; None when there is no such workspace."""
    return cached_lookup(keys.signer_record(workspace_id), lambda session: keys.signer(session, workspace_id),
                         keys.Signer.as_dict, keys.Signer.from_dict)


def verify_signature(workspace_id: int, signature: str | None, body: bytes) -> Principal:
    """The principal of a ``/segment/{workspace_id}`` request signed with Segment's shared secret.

    ``X-Signature`` is the hex HMAC-SHA1 of the raw request body (as sent, before
    any gzip decoding) keyed with the workspace's secret; compared in constant time.
    """
    if not signature:
        raise ApiError(401, "unauthorized", "Missing X-Signature: sign the request with the workspace's Segment "
                       "shared secret (Webhooks destination, Settings → Shared Secret), or send an API key.")
    found = signer_for(workspace_id)
    if found is None or not found.secret:
        # Same answer for "no such workspace" and "no secret set": ids are not probed this way.
        raise ApiError(401, "unauthorized", "Wrong X-Signature: this workspace has no Segment shared secret set "
                       "(set it in the dashboard's settings, PATCH /api/v1/workspace or the CLI).")
    expected = hmac.new(found.secret.encode("utf-8"), body, hashlib.sha1).hexdigest()
    # Bytes: compare_digest rejects non-ASCII str, and a header may hold anything.
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode("utf-8", "replace")):
        raise ApiError(401, "unauthorized", "Wrong X-Signature: it is not the HMAC-SHA1 of the body with this "
                       "workspace's Segment shared secret.")
    g.principal = found.principal
    return found.principal


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def authenticate(body: Any = None, scope: str = "ingest") -> Principal:
    """The principal of this request; raises 401 (no/unknown/revoked key) or 403 (scope)."""
    key = key_from_header(request.headers.get("Authorization"))
    if key is None and isinstance(body, dict) and isinstance(body.get("writeKey"), str):
        key = body["writeKey"] or None
    if key is None:
        raise ApiError(401, "unauthorized", "Missing API key: send it as HTTP Basic user name, "
                       "a Bearer token, or writeKey in the body.")
    principal = principal_for(key)
    if principal is None:
        raise ApiError(401, "unauthorized", "Unknown or revoked API key.")
    if principal.scope not in ALLOWED[scope]:
        raise ApiError(403, "forbidden", f"This API key has the {principal.scope} scope; {NEEDS[scope]}.")
    g.principal = principal
    return principal


def workspace_id() -> int:
    """The authenticated request's workspace."""
    return g.principal.workspace_id


def actor() -> str:
    """Who is acting, for the audit log: the request's API key."""
    return f"api-key:{g.principal.key_id}"


def require_admin() -> None:
    """``before_request`` of the admin API blueprints: an admin key, in any form the receiver takes."""
    authenticate(request.get_json(silent=True) if request.is_json else None, scope="admin")
