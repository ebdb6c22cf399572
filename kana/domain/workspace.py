"""Workspace settings: one place that changes them for the API, the dashboard and the CLI."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from kana.errors import KanaError
from kana.models import Workspace

# Text settings and their longest values; a blank value clears them (except the name, which must stay set).
TEXT = {"name": 200, "billing_provider": 20, "stripe_api_key": 500, "chargebee_site": 200, "chargebee_api_key": 500,
        "segment_shared_secret": 500}
FLAGS = ("keep_ip",)


class SettingError(KanaError, ValueError):
    """An invalid setting; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"Invalid request. {field}: {message}", {field: [message]})
        self.field = field
        self.message = message


def update(session: Session, workspace_id: int, changes: dict[str, Any]) -> Workspace:
    """Apply ``changes`` (strings, booleans or None, as the surface read them) to the workspace.

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
        if value is not None and ("\x00" in value or len(value) > TEXT[field]):
            # PostgreSQL text cannot hold U+0000.
            raise SettingError(field, f"Must be at most {TEXT[field]} characters, without NUL (\\u0000).")
        setattr(row, field, value)
    return row
