"""API key authentication for the receiver and the admin API.

The key may arrive as ``Authorization: Basic base64(key:)`` (Segment's
convention), ``Bearer key``, a bare ``key``, or ``writeKey`` in the JSON body.
Lookups are cached per process for ``settings.key_cache_ttl`` seconds so the
receiver does no database work per call; a revocation takes effect within that.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from typing import Any

from flask import current_app, g, request

from kana.db import SessionLocal, read_only
from kana.domain import keys
from kana.domain.keys import Principal
from kana.errors import ApiError

_cache: dict[str, tuple[float, Principal | None]] = {}
# Which key scopes each surface takes: a check key (held by a customer's backend)
# answers entitlement checks and nothing else.
ALLOWED = {"ingest": ("ingest", "admin"), "check": ("check", "admin"), "admin": ("admin",)}
NEEDS = {"ingest": "sending calls needs an ingest or admin key",
         "check": "entitlement checks need a check or admin key",
         "admin": "the admin API needs an admin key"}
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


def principal_for(key: str) -> Principal | None:
    ttl = current_app.extensions["kana"].settings.key_cache_ttl
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    with read_only(SessionLocal()) as session:
        principal = keys.lookup(session, key)
    with _cache_lock:
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[key] = (now + ttl, principal)
    return principal


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
