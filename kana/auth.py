"""API key authentication for the receiver and the admin API.

The key may arrive as ``Authorization: Basic base64(key:)`` (Segment's
convention), ``Bearer key``, a bare ``key``, or ``writeKey`` in the JSON body.
Lookups are cached per process for ``settings.key_cache_ttl`` seconds so the
receiver does no database work per call; a revocation takes effect within that.
``/segment/{workspace_id}`` may instead be signed with the workspace's Segment
shared secret (``verify_signature``), looked up through the same cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import g, request
from sqlalchemy.orm import Session

from kana import runtime
from kana.db import SessionLocal, read_only
from kana.domain import keys
from kana.domain.keys import Principal
from kana.errors import ApiError

_cache: dict[tuple, tuple[float, Any]] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 10_000


def cached_lookup(cache_key: tuple, load: Callable[[Session], Any]) -> Any:
    """``load(session)``'s result, cached per process for ``settings.key_cache_ttl`` seconds.

    The one cache of the receiver's database lookups (API keys, workspaces'
    shared secrets), so a call needs no database work while the entry is fresh;
    a revocation or settings change takes effect within the TTL (the surfaces
    that change settings also clear it).
    """
    ttl = runtime.current().settings.key_cache_ttl
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(cache_key)
    if hit is not None and hit[0] > now:
        return hit[1]
    with read_only(SessionLocal()) as session:
        value = load(session)
    with _cache_lock:
        if len(_cache) > _CACHE_MAX:
            _cache.clear()
        _cache[cache_key] = (now + ttl, value)
    return value


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


def principal_for(key: str) -> Principal | None:
    """The principal of a clear-text API key; None when unknown or revoked."""
    return cached_lookup(("key", key), lambda session: keys.lookup(session, key))


def signer_for(workspace_id: int) -> keys.Signer | None:
    """The workspace's Segment shared secret and principal; None when there is no such workspace."""
    return cached_lookup(("signer", workspace_id), lambda session: keys.signer(session, workspace_id))


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
