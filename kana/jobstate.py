"""Background jobs (reprocessing, flag refreshes, imports) as the API and the dashboard show them."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, parse_job_id
from rq.queue import Queue

from kana.domain import ids

# RQ's statuses folded into the four a caller acts on.
STATUSES = {
    "queued": "queued",
    "created": "queued",
    "deferred": "queued",
    "scheduled": "queued",
    "ready_to_enqueue": "queued",
    "rate_limited": "queued",
    "started": "started",
    "finished": "finished",
    "failed": "failed",
    "stopped": "failed",
    "canceled": "failed",
}
# Counters a job keeps in its meta while it runs (shown beside the progress bar).
METERS = ("total", "scanned", "mapped", "customers")


def workspace_job(redis: Redis, job_id: str, workspace_id: int) -> Job | None:
    """The job if it was started for this workspace; None when unknown, expired or another's.

    Jobs started for a workspace carry its id in their meta; the pipeline's own
    drain jobs carry none and belong to no workspace. Redis errors propagate.
    An id of another shape (a ``?job=`` argument) is no job: RQ would raise ValueError.
    """
    if not isinstance(job_id, str) or not re.fullmatch(ids.JOB_ID, job_id):
        return None
    try:
        job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return None
    return job if job.meta.get("workspace_id") == workspace_id else None


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _utc(moment: datetime | None) -> str | None:
    # RQ keeps naive UTC datetimes.
    return moment.replace(tzinfo=UTC).isoformat() if moment else None


def describe(job: Job) -> dict[str, Any]:
    """Status, progress (0..1), result or error, and the job's meters."""
    raw_status = job.get_status(refresh=False)
    raw = raw_status.value if raw_status is not None else "queued"
    status = STATUSES.get(raw, "queued")
    try:
        progress = min(1.0, max(0.0, float(job.meta.get("progress") or 0.0)))
    except (TypeError, ValueError):
        progress = 0.0
    state: dict[str, Any] = {"id": job.id, "status": status, "progress": 1.0 if status == "finished" else progress}
    if status == "finished":
        state["result"] = _json_safe(job.return_value())
    elif status == "failed":
        result = job.latest_result()
        lines = [line for line in (getattr(result, "exc_string", None) or "").splitlines() if line.strip()]
        state["error"] = lines[-1].strip() if lines else f"the job was {raw}"
    state["enqueued_at"] = _utc(job.enqueued_at)
    state["ended_at"] = _utc(job.ended_at)
    state["kind"] = job.meta.get("kind") or job.func_name.rsplit(".", 1)[-1]
    state["meta"] = {k: v for k, v in job.meta.items() if k in METERS}
    state["description"] = job.description
    return state


# How many of the newest ids each registry is searched through for a workspace's jobs:
# the pipeline's drain jobs share the queue, and carry no workspace.
SCAN = 500


def workspace_jobs(queue: Queue, workspace_id: int, limit: int = 50) -> list[Job]:
    """The workspace's recent jobs, newest first: queued, running, finished and failed.

    Read from the queue and RQ's registries (jobs whose meta names the workspace);
    finished and failed jobs stay listed as long as RQ keeps their results.
    """
    ids = list(queue.get_job_ids(0, SCAN - 1))
    for registry in (queue.started_job_registry, queue.deferred_job_registry, queue.scheduled_job_registry,
                     queue.finished_job_registry, queue.failed_job_registry):
        ids.extend(parse_job_id(i) for i in registry.get_job_ids(0, SCAN - 1, desc=True, cleanup=False))
    jobs = [job for job in Job.fetch_many(list(dict.fromkeys(ids)), connection=queue.connection)
            if job is not None and job.meta.get("workspace_id") == workspace_id]
    jobs.sort(key=_started, reverse=True)
    return jobs[:limit]


def _started(job: Job) -> datetime:
    moment = job.enqueued_at or job.created_at
    # RQ keeps some times naive (UTC) and some aware: compare them naive.
    return moment.replace(tzinfo=None) if moment else datetime.min
