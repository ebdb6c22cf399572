"""Workspace settings: one place that changes them for the API, the dashboard and the CLI."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from kana.models import Workspace

# Text settings; a blank value clears them (except the name, which must stay set).
TEXT = ("name", "billing_provider", "stripe_api_key", "chargebee_site", "chargebee_api_key", "segment_shared_secret")
FLAGS = ("keep_ip",)


class SettingError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def update(session: Session, workspace_id: int, changes: dict[str, Any]) -> Workspace:
    """Apply ``changes`` (already validated for type and length by the surface) to the workspace.

    Callers drop the receiver's cached principals afterwards (``kana.auth.clear_cache``):
    they carry billing_provider, keep_ip and the shared secret.
    """
    row = session.get(Workspace, workspace_id)
    if row is None:
        raise SettingError("workspace", f"No workspace {workspace_id}.")
    for field, value in changes.items():
        if field in FLAGS:
            setattr(row, field, bool(value))
            continue
        if field not in TEXT:
            raise SettingError(field, f"Unknown setting {field!r}.")
        if isinstance(value, str):
            value = value.strip() or None
        if field == "name" and value is None:
            raise SettingError("name", "Must not be blank.")
        setattr(row, field, value)
    return row
