"""Flag refreshes (SPEC §6) on demand: a job, the same one the scheduler runs."""

from __future__ import annotations

from redis.exceptions import RedisError

from kana.errors import Unavailable
from kana.runtime import Runtime

JOB = "jobs.flags.refresh"


def refresh(rt: Runtime, workspace_id: int) -> str:
    """Queue a refresh of the workspace's flags; its job id."""
    try:
        job = rt.queue.enqueue(JOB, workspace_id, job_timeout=3600, result_ttl=24 * 3600,
                               meta={"workspace_id": workspace_id, "progress": 0.0})
    except RedisError as exc:
        raise Unavailable() from exc
    return job.id
