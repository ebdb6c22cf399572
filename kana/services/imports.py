"""Starting imports: a CSV file of users, or a workspace's Stripe/Chargebee customers (jobs in jobs/imports.py)."""

from __future__ import annotations

import uuid

from redis.exceptions import RedisError

from kana.db import SessionLocal
from kana.errors import Unavailable
from kana.imports import csvfile, customers
from kana.runtime import Runtime

# The uploaded file waits in Redis, which the web process and every worker
# share (a local directory is not shared between machines); it is deleted once
# imported and expires if no worker ever picks the job up.
UPLOAD_TTL = 24 * 3600
JOB_TIMEOUT = 6 * 3600
KEEP = 7 * 24 * 3600  # results and failures of import jobs, for the progress pages
CSV_JOB = "jobs.imports.csv_import"
BILLING_JOB = "jobs.imports.billing"


def upload_key(import_id: int) -> str:
    return f"kana:csv-upload:{import_id}"


def start_csv(rt: Runtime, workspace_id: int, filename: str | None, data: bytes, *, actor: str) -> tuple[int, str]:
    """Check the file, record the import, queue its job; ``(import_id, job_id)``.

    File-level problems (encoding, header, size) raise ``csvfile.CsvError`` now
    rather than being found later by the job. With Redis down the import is
    recorded as failed ("upload it again") and Unavailable is raised.
    """
    csvfile.parse(data)
    job_id = f"csv-import-{uuid.uuid4().hex}"
    with SessionLocal.begin() as s:
        import_id = csvfile.create_import(s, workspace_id, filename, job_id).id
    try:
        rt.redis.set(upload_key(import_id), data, ex=UPLOAD_TTL)
        rt.queue.enqueue(CSV_JOB, import_id, actor, job_id=job_id, job_timeout=JOB_TIMEOUT, result_ttl=KEEP,
                         failure_ttl=KEEP, meta={"workspace_id": workspace_id, "progress": 0.0})
    except RedisError as exc:
        csvfile.finish(SessionLocal, import_id, "failed", "The job queue was unreachable; upload the file again.")
        raise Unavailable() from exc
    return import_id, job_id


def start_billing(rt: Runtime, workspace_id: int, provider: str) -> str:
    """Queue the import of the workspace's customers of ``provider``; its job id.

    Missing credentials raise ``customers.ImportFailed`` (saying what to set) before anything is queued.
    """
    with SessionLocal() as s:
        customers.credentials(s, workspace_id, provider, rt.settings)
    try:
        job = rt.queue.enqueue(BILLING_JOB, workspace_id, provider, job_timeout=JOB_TIMEOUT, result_ttl=KEEP,
                               failure_ttl=KEEP, meta={"workspace_id": workspace_id, "progress": 0.0})
    except RedisError as exc:
        raise Unavailable() from exc
    return job.id
