"""Reprocessing jobs: apply the current mapping rules and features to stored unmapped events."""

from __future__ import annotations

import time

from rq import get_current_job

from jobs import runtime
from kana.db import SessionLocal
from kana.domain import reprocess as retro

# Progress is written to Redis at most this often (each chunk is ~0.1-0.5 s).
PROGRESS_EVERY = 0.5


def reprocess(workspace_id: int) -> dict:
    """Reprocess the workspace's unmapped events; ``job.meta["progress"]`` goes 0 → 1."""
    runtime()  # configures the engine and SessionLocal in this worker process
    job = get_current_job()
    last = 0.0

    def report(state: retro.Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if job is None or (now - last < PROGRESS_EVERY and state.scanned < state.total):
            return
        last = now
        job.meta.update(progress=state.fraction, **state.as_dict())
        job.save_meta()

    state = retro.reprocess(SessionLocal, workspace_id, progress=report)
    if job is not None:
        job.meta.update(progress=1.0, **state.as_dict())
        job.save_meta()
    return {"scanned": state.scanned, "mapped": state.mapped}
