"""Import jobs: CSV files, Stripe and Chargebee customers. Progress goes to ``job.meta["progress"]``."""

from __future__ import annotations

from typing import Any

from rq import get_current_job

from jobs import runtime
from kana.db import SessionLocal
from kana.imports import csvfile, customers
from kana.services.imports import upload_key


def _report(progress: float, **extra: Any) -> None:
    job = get_current_job()
    if job is not None:
        job.meta.update(progress=progress, **extra)
        job.save_meta()


def csv_import(import_id: int, actor: str | None = None) -> dict[str, Any]:
    rt = runtime()
    data = rt.redis.get(upload_key(import_id))
    if data is None:
        return csvfile.finish(SessionLocal, import_id, "failed",
                            "The uploaded file is no longer available (it expires after a day); upload it again.")
    result = csvfile.run_import(SessionLocal, import_id, data, actor=actor,
                              progress=lambda done, total: _report(done / total if total else 1.0))
    rt.redis.delete(upload_key(import_id))
    return result


def billing(workspace_id: int, provider: str) -> dict[str, int]:
    """Import a workspace's Stripe or Chargebee customers; the result counts created/updated/unchanged."""
    rt = runtime()
    # A listing has no total up front: progress stays 0 until done, "customers" says how far it got.
    return customers.run(SessionLocal, workspace_id, provider, rt.settings,
                              progress=lambda seen: _report(0.0, customers=seen))
