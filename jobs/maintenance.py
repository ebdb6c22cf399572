"""Scheduled upkeep (run by RQ's cron scheduler, see config/cron.py)."""

from __future__ import annotations

from jobs import runtime
from kana.ingest import spool


def recover() -> dict:
    """Re-wake partitions whose events no live drain holds (a killed worker, a lost job)."""
    rt = runtime()
    stranded = spool.stranded(rt.redis, rt.settings.partitions)
    if stranded:
        rt.wake(stranded)
    return {"woken": stranded}
