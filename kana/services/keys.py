"""API keys: created (shown once), revoked (effective at once here, within the key cache TTL elsewhere)."""

from __future__ import annotations

from typing import Any

from redis import Redis

from kana import auth
from kana.db import SessionLocal
from kana.domain import ids, keys
from kana.errors import NotFound
from kana.serializers import key_json


def create(workspace_id: int, scope: str, name: str | None = None) -> dict[str, Any]:
    """The key's row as JSON plus ``api_key``, the only time the key is shown: it is stored hashed."""
    with SessionLocal.begin() as s:
        row, plain = keys.create_key(s, workspace_id, scope, name=name)
        return {**key_json(row), "api_key": plain}


def revoke(workspace_id: int, key_id: int, redis: Redis | None = None) -> None:
    """With ``redis``, the key's record there goes too (see ``kana.domain.keys.remember``)."""
    with SessionLocal.begin() as s:
        if not ids.in_id_range(key_id) or not keys.revoke_key(s, workspace_id, key_id, redis=redis):
            raise NotFound(f"No API key {key_id} in this workspace.")
    auth.clear_cache()
