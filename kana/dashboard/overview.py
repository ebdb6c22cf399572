"""Overview: the two flag boxes, event counters, events per hour; background job jobstate."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from flask import abort, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from redis.exceptions import RedisError
from rq.job import Job
from sqlalchemy import func, literal_column, select
from sqlalchemy.orm import Session

import kana.dashboard.charts as charts
from kana import jobstate
from kana.dashboard.common import back_to, bp, ws
from kana.db import SessionLocal
from kana.domain import flags, ledger
from kana.ingest import spool
from kana.models import DeadLetter, Event, utcnow
from kana.runtime import current
from kana.services import flags as flag_actions

CHART_HOURS = 24


def _as_utc_hour(value: datetime | str) -> datetime:
    # PostgreSQL answers naive UTC datetimes, SQLite the formatted text.
    return ledger.floor(datetime.fromisoformat(value) if isinstance(value, str) else value, "hour")


def events_per_hour(session: Session, workspace_id: int, hours: int = CHART_HOURS) -> list[tuple[datetime, int]]:
    """Events received per UTC hour over the last ``hours`` hours (zero-filled, oldest first).

    One grouped query on (workspace_id, received_at), an index range scan.
    """
    end = ledger.floor(utcnow(), "hour") + timedelta(hours=1)
    start = end - timedelta(hours=hours)
    if session.get_bind().dialect.name == "postgresql":
        # Literals, not parameters: PostgreSQL matches GROUP BY to the selected expression by its text.
        bucket = func.date_trunc(literal_column("'hour'"), func.timezone(literal_column("'UTC'"), Event.received_at))
    else:
        bucket = func.strftime("%Y-%m-%d %H:00:00", Event.received_at)
    bucket = bucket.label("bucket")
    rows = session.execute(
        select(bucket, func.count())
        .where(Event.workspace_id == workspace_id, Event.received_at >= start, Event.received_at < end)
        .group_by(bucket)
    )
    counts = {_as_utc_hour(b): n for b, n in rows}
    return [(b, counts.get(b, 0)) for b in ledger.buckets(start, end, "hour")]


def event_stats(session: Session, workspace_id: int) -> dict[str, int | None]:
    """Received / processed / pending / failed, as ``GET /api/v1/stats`` counts them."""
    try:
        counters: dict[str, int] | None = spool.workspace_counters(current().redis, workspace_id)
    except RedisError:
        counters = None
    processed = session.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == workspace_id))
    failed = session.scalar(
        select(func.count()).select_from(DeadLetter).where(DeadLetter.workspace_id == workspace_id)
    )
    return {
        "received": counters.get("received", 0) if counters is not None else None,
        "processed": processed or 0,
        "pending": max(0, counters.get("pending", 0)) if counters is not None else None,
        "failed": failed or 0,
    }


@bp.get("/")
def overview() -> ResponseReturnValue:
    workspace_id = ws()
    with SessionLocal() as s:
        summary = flags.summary(s, workspace_id, groups_limit=5)
        stats = event_stats(s, workspace_id)
        hourly = events_per_hour(s, workspace_id)
    chart = charts.bar_chart([(b.strftime("%H:00"), n) for b, n in hourly], labels=12)
    job_id = request.args.get("job")
    return render_template("dashboard/overview.html", summary=summary, stats=stats, chart=chart,
                           refreshed_at=_parse_time(summary["refreshed_at"]),
                           job=job_state(job_id) if job_id else None)


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@bp.post("/flags/refresh")
def refresh_flags() -> ResponseReturnValue:
    back_to("dashboard.overview")
    return redirect(url_for("dashboard.overview", job=flag_actions.refresh(current(), ws())))


# --- background jobs (flag refreshes, reprocessing, billing imports) ----------------------------------


def job_state(job_id: str) -> dict[str, Any] | None:
    """A job of this workspace as the progress panels show it; None when unknown or another's."""
    try:
        job = jobstate.workspace_job(current().redis, job_id, ws())
    except RedisError:
        return {"id": job_id, "status": "unknown", "progress": 0.0, "meta": {},
                "error": "The job queue (Redis) is unreachable."}
    if job is None:
        return None
    return job_state_of(job)


def job_state_of(job: Job) -> dict[str, Any]:
    state = jobstate.describe(job)
    state["summary"] = job_summary(state)
    return state


def job_summary(state: dict[str, Any]) -> str:
    """One sentence a person reads under the progress bar."""
    status, kind, meta = state["status"], state["kind"], state["meta"]
    result = state.get("result") if isinstance(state.get("result"), dict) else {}
    if status == "queued":
        return "Waiting for a worker…"
    if status == "failed":
        return f"Failed: {state.get('error')}"
    if status == "unknown":
        return state.get("error") or "Unknown"
    done = status == "finished"
    if kind == "reprocess":
        if done:
            return (f"Done: mapped {result.get('mapped', 0):,} of {result.get('scanned', 0):,} "
                    "stored unmapped events.")
        return (f"Reprocessing stored unmapped events: {meta.get('scanned', 0):,} of {meta.get('total', 0):,} "
                f"looked at, {meta.get('mapped', 0):,} mapped so far…")
    if kind == "refresh":
        if done:
            return (f"Flags refreshed: {result.get(flags.MISSING_BILLING_ID, 0):,} users without a billing id, "
                    f"{result.get(flags.DUPLICATE_EMAIL, 0):,} sharing an email.")
        return "Refreshing flags…"
    if kind == "billing":
        if done:
            return ("Import finished: " + ", ".join(f"{v:,} {k}" for k, v in result.items()) + ".")
        return f"Importing customers: {meta.get('customers', 0):,} read so far…"
    return "Finished." if done else "Running…"


@bp.get("/jobs")
def jobs() -> ResponseReturnValue:
    """This workspace's recent background jobs (the installation-wide queues are /rq, for operators)."""
    try:
        states = [job_state_of(job) for job in jobstate.workspace_jobs(current().queue, ws())]
        error = None
    except RedisError:
        states, error = [], "The job queue (Redis) is unreachable; the list shows again when it is back."
    return render_template("dashboard/jobs.html", jobs=states, error=error)


@bp.get("/jobs/<job:job_id>.json")
def job_json(job_id: str) -> ResponseReturnValue:
    state = job_state(job_id)
    if state is None:
        abort(404, description="No such job in this workspace (or its result has expired).")
    return jsonify(state)
