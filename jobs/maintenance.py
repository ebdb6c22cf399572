"""Scheduled upkeep (run by RQ's cron scheduler, see config/cron.py)."""

from __future__ import annotations

from jobs import runtime
from kana import queue as events_queue


def recover() -> dict:
    """Re-wake partitions whose events no live drain holds (a killed worker, a lost job)."""
    rt = runtime()
    stranded = events_queue.stranded(rt.redis, rt.settings.partitions)
    if stranded:
        rt.wake(stranded, force=True)
    return {"woken": stranded}
