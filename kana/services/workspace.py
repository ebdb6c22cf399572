"""Workspace settings: name, billing provider and its write-only credentials."""

from __future__ import annotations

from typing import Any

from kana import auth
from kana.db import SessionLocal
from kana.errors import field_error
from kana.models import Workspace
from kana.serializers import workspace_json

SETTINGS = ("name", "billing_provider", "stripe_api_key", "chargebee_site", "chargebee_api_key")


def update(workspace_id: int, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply ``changes`` (a subset of SETTINGS; blank text is None); the workspace as JSON."""
    with SessionLocal.begin() as s:
        row = s.get(Workspace, workspace_id)
        for field, value in changes.items():
            if isinstance(value, str):
                value = value.strip() or None
            if field == "name" and value is None:
                raise field_error("name", "Must not be blank.")
            setattr(row, field, value)
        body = workspace_json(row)
    # Cached principals carry billing_provider: drop them so the receiver
    # validates billing ids against the new setting at once.
    auth.clear_cache()
    return body
