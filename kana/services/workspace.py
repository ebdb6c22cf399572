"""Workspace settings: name, billing provider, write-only credentials, Segment shared secret, keep_ip."""

from __future__ import annotations

from typing import Any

from kana import auth
from kana.db import SessionLocal
from kana.domain import workspace
from kana.serializers import workspace_json


def update(workspace_id: int, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply ``changes`` (``workspace.TEXT``/``FLAGS`` settings; blank text is None); the workspace as JSON."""
    with SessionLocal.begin() as s:
        body = workspace_json(workspace.update(s, workspace_id, changes))
    # Cached principals carry billing_provider, keep_ip and the shared secret:
    # drop them so the receiver uses the new settings at once.
    auth.clear_cache()
    return body
