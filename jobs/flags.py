"""Flag refresh jobs (SPEC §6): run by RQ's cron scheduler and on demand (``kana.services.flags``)."""

from __future__ import annotations

from typing import Any

from jobs import runtime
from kana.db import SessionLocal
from kana.domain import flags


def refresh(workspace_id: int | None = None) -> dict[str, Any]:
    """Refresh one workspace's flags, or every workspace's when none is given."""
    runtime()
    if workspace_id is None:
        return {"workspaces": flags.refresh_all(SessionLocal)}
    with SessionLocal.begin() as session:
        return flags.refresh(session, workspace_id)


def refresh_all() -> dict[str, Any]:
    """The scheduled run (config/cron.py): every workspace."""
    return refresh(None)
