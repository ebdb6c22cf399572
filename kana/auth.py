"""API key authentication for the receiver and the admin API.

The key may arrive as ``Authorization: Basic base64(key:)`` (Segment's
convention), ``Bearer key``, a bare ``key``, or ``writeKey`` in the JSON body.
Lookups are cached per process for ``settings.key_cache_ttl`` seconds so the
receiver does no database work per call; a revocation takes effect within that.
Verified keys are also recorded in Redis, which answers while the database is down.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from typing import Any

from flask import g, request
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from kana import outages, runtime
from kana.db import SessionLocal, read_only
from kana.domain import keys
from kana.domain.keys import Principal
from kana.errors import ApiError

log = logging.getLogger(__name__)

# key hash → (fresh until, principal); kept past that as the last answer.
_cache: dict[str, tuple[float, Principal | None]] = {}
_cache_lock = threading.Lock()


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


# While the database is unreachable, key checks stop trying it for this long
# after each failure (a down database can take seconds to refuse).
DATABASE_RETRY = 2.0
_database = outages.Outage("database (API key checks)", log)
_database_retry_at = 0.0


def principal_for(key: str) -> Principal | None:
    """The principal of a clear-text API key, or None when it is unknown or revoked.

    The database answers (cached per process for ``key_cache_ttl`` seconds, so
    a revocation takes effect within that) and its answer is kept in Redis too
    (``keys.remember``; a revoked key's record is removed). While the database
    is unreachable the Redis record answers, else this process's last answer
    however old; with neither, the database error propagates (the receiver
    answers 503 and Segment retries).
    """
    global _database_retry_at
    rt = runtime.current()
    digest = keys.hash_key(key)
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(digest)
    if hit is not None and hit[0] > now:
        return hit[1]
    failure: Exception | None = None
    if now >= _database_retry_at:
        try:
            with read_only(SessionLocal()) as session:
                known, principal = keys.lookup_hash(session, digest)
        except (DBAPIError, PoolTimeout) as exc:
            failure = exc
            _database_retry_at = now + DATABASE_RETRY
            _database.down(exc)
        else:
            _database.up()
            _remember(digest, principal, now + rt.settings.key_cache_ttl)
            if known:
                try:
                    keys.remember(rt.redis, digest, principal)
                except (RedisError, OSError):
                    pass  # the receiver answers 503 for Redis itself; the record is rewritten next time
            return principal
    try:
        recorded = keys.recall(rt.redis, digest)
    except (RedisError, OSError):
        recorded = None
    if recorded is not None:
        _remember(digest, recorded, now + rt.settings.key_cache_ttl)
        return recorded
    if hit is not None:
        return hit[1]
    if failure is None:
        # Between retries of a down database, without an answer for this key.
        raise DatabaseDown("the database is unreachable; retrying shortly")
    raise failure


class DatabaseDown(DBAPIError):
    """No answer for a key while the database is skipped; a ``DBAPIError`` like the failure itself."""

    def __init__(self, message: str) -> None:
        super().__init__(statement=None, params=None, orig=ConnectionError(message))


def _remember(digest: str, principal: Principal | None, until: float) -> None:
    with _cache_lock:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[digest] = (until, principal)


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
    if scope == "admin" and principal.scope != "admin":
        raise ApiError(403, "forbidden", "This API key has the ingest scope; the admin API needs an admin key.")
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
