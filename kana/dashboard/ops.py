"""CSV export/import, events (unmapped, failed), API keys and workspace settings."""

from __future__ import annotations

import csv
import io
import logging
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Response, abort, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from redis.exceptions import RedisError
from sqlalchemy import select

from jobs import imports as import_jobs
from kana import auth
from kana.dashboard import bp
from kana.dashboard.common import PAGE_SIZE, actor, int_arg, notice, runtime, ws
from kana.db import SessionLocal, read_only
from kana.domain import flags, keys
from kana.imports import csvfile, customers
from kana.ingest import processor
from kana.models import CsvImport, DeadLetter, Event, Workspace

log = logging.getLogger(__name__)

EVENT_STATUSES = ("unmapped", "mapped", "processed")
UNREACHABLE = "The job queue (Redis) is unreachable; try again shortly."


# --- CSV ----------------------------------------------------------------------------------


@bp.get("/csv")
def csv_page() -> ResponseReturnValue:
    with SessionLocal() as s:
        imports = csvfile.recent_imports(s, ws(), limit=20)
    return render_template("dashboard/csv.html", imports=imports, max_mb=csvfile.MAX_BYTES // (1024 * 1024))


@bp.get("/csv/export")
def csv_export() -> ResponseReturnValue:
    flag = request.args.get("flag") or None
    if flag is not None and flag not in (*flags.FLAGS, flags.ANY):
        abort(400, description=f"Unknown flag {flag!r}.")
    workspace_id = ws()

    def generate() -> Iterator[str]:
        # Its own session: the body streams after the view has returned.
        with SessionLocal() as s:
            yield from csvfile.export_lines(s, workspace_id, flag=flag)

    name = f"users-{flag}.csv" if flag else "users.csv"
    return Response(generate(), content_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@bp.post("/csv/import")
def csv_import() -> ResponseReturnValue:
    limit = csvfile.MAX_BYTES
    too_big = f"The file is larger than {limit // (1024 * 1024)} MB; split it into smaller files."
    # Refuse before reading (and spooling) a body that can't be accepted anyway.
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        notice(too_big, "error")
        return redirect(url_for("dashboard.csv_page"))
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        notice("Choose a CSV file to import.", "error")
        return redirect(url_for("dashboard.csv_page"))
    data = upload.stream.read(limit + 1)
    if len(data) > limit:
        notice(too_big, "error")
        return redirect(url_for("dashboard.csv_page"))
    try:
        csvfile.parse(data)  # file-level problems are answered now, not found later by the job
    except csvfile.CsvError as exc:
        where = f" (line {exc.line})" if exc.line is not None else ""
        notice(f"{upload.filename}: {exc.message}{where}", "error")
        return redirect(url_for("dashboard.csv_page"))
    workspace_id = ws()
    job_id = f"csv-import-{uuid.uuid4().hex}"
    with SessionLocal.begin() as s:
        import_id = csvfile.create_import(s, workspace_id, upload.filename, job_id).id
    rt = runtime()
    try:
        import_jobs.enqueue_csv(rt.queue, rt.redis, import_id, job_id, data, workspace_id=workspace_id,
                                actor=actor())
    except RedisError:
        csvfile.finish(SessionLocal, import_id, "failed", "The job queue was unreachable; upload the file again.")
        notice(UNREACHABLE, "error")
    return redirect(url_for("dashboard.csv_import_page", import_id=import_id))


def _import_or_404(session: Any, import_id: int) -> CsvImport:
    imp = session.scalar(select(CsvImport).where(CsvImport.id == import_id, CsvImport.workspace_id == ws()))
    if imp is None:
        abort(404, description=f"No CSV import {import_id} in this workspace.")
    return imp


def import_summary(body: dict[str, Any]) -> str:
    if body["status"] == "queued":
        return "Waiting for a worker…"
    counts = (f"{body['processed']:,} of {body['total']:,} rows: {body['created']:,} created, "
              f"{body['updated']:,} updated, {body['merged']:,} merged, {body['unchanged']:,} unchanged, "
              f"{body['failed']:,} failed")
    if body["status"] == "failed":
        return f"Import failed: {body['error'] or 'unknown error'}"
    if body["status"] == "finished":
        return "Import finished. " + counts
    return "Importing… " + counts


REPORT_ROWS_SHOWN = 200


@bp.get("/csv/imports/<int:import_id>")
def csv_import_page(import_id: int) -> ResponseReturnValue:
    with SessionLocal() as s:
        imp = _import_or_404(s, import_id)
        body = csvfile.import_json(imp)
    report = body["report"]
    # Failed rows are what the operator has to act on: they come first.
    shown = sorted(report, key=lambda r: (r.get("status") != "failed", r.get("line", 0)))[:REPORT_ROWS_SHOWN]
    return render_template("dashboard/csv_import.html", imp=body, summary=import_summary(body), shown=shown,
                           done=body["status"] in ("finished", "failed"))


@bp.get("/csv/imports/<int:import_id>/report.csv")
def csv_import_report(import_id: int) -> ResponseReturnValue:
    """The whole line-numbered report as CSV (line, status, kana_id, what happened)."""
    with SessionLocal() as s:
        report = list(_import_or_404(s, import_id).report or [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(("line", "status", "kana_id", "detail"))
    for row in report:
        errors = "; ".join(f"{k}: {v}" for k, v in (row.get("errors") or {}).items())
        detail = errors or ", ".join(row.get("actions") or [])
        writer.writerow((row.get("line"), row.get("status"), row.get("kana_id") or "", csvfile.protect(detail)))
    return Response(buffer.getvalue(), content_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="import-{import_id}-report.csv"'})


@bp.get("/csv/imports/<int:import_id>.json")
def csv_import_json(import_id: int) -> ResponseReturnValue:
    with read_only(SessionLocal()) as s:
        body = csvfile.import_json(_import_or_404(s, import_id), report=False)
    return jsonify({**body, "summary": import_summary(body),
                    "progress": 1.0 if body["status"] == "finished" else body["progress"]})


# --- events ------------------------------------------------------------------------------


@bp.get("/events")
def events() -> ResponseReturnValue:
    status = request.args.get("status", "unmapped")
    if status not in EVENT_STATUSES:
        abort(400, description=f"Unknown status {status!r}.")
    before = int_arg("before")
    stmt = select(Event).where(Event.workspace_id == ws(), Event.status == status)
    if before is not None:
        stmt = stmt.where(Event.id < before)
    with SessionLocal() as s:
        rows = list(s.scalars(stmt.order_by(Event.id.desc()).limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return render_template("dashboard/events.html", rows=rows, status=status, statuses=EVENT_STATUSES,
                           older=rows[-1].id if more and rows else None, paged=before is not None)


@bp.get("/events/failed")
def dead_letters() -> ResponseReturnValue:
    before = int_arg("before")
    stmt = select(DeadLetter).where(DeadLetter.workspace_id == ws())
    if before is not None:
        stmt = stmt.where(DeadLetter.id < before)
    with SessionLocal() as s:
        rows = list(s.scalars(stmt.order_by(DeadLetter.id.desc()).limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return render_template("dashboard/dead_letters.html", rows=rows,
                           older=rows[-1].id if more and rows else None, paged=before is not None)


@bp.post("/events/failed/<int:dead_letter_id>/retry")
def retry_dead_letter(dead_letter_id: int) -> ResponseReturnValue:
    """Put a failed call back on its partition queue, as ``POST /api/v1/events/failed/{id}/retry`` does."""
    workspace_id = ws()
    rt = runtime()
    try:
        with SessionLocal.begin() as s:
            done = processor.requeue(s, rt.redis, rt.settings.partitions, workspace_id, dead_letter_id)
    except processor.NotRetryable as exc:
        notice(str(exc), "error")
        return redirect(url_for("dashboard.dead_letters"))
    except RedisError:
        notice(UNREACHABLE, "error")
        return redirect(url_for("dashboard.dead_letters"))
    if done is None:
        abort(404, description=f"No failed event {dead_letter_id} in this workspace.")
    try:
        rt.enqueue_drains(done.partitions)
    except RedisError as exc:
        # The call is queued; the recovery job wakes stranded partitions.
        log.warning("requeued %s but could not enqueue its drain: %s", done.message_id, exc)
    message_id = done.message_id
    notice(f"Requeued {message_id}; it is processed again shortly.")
    return redirect(url_for("dashboard.dead_letters"))


# --- API keys -------------------------------------------------------------------------------


@bp.get("/keys")
def api_keys() -> ResponseReturnValue:
    with SessionLocal() as s:
        rows = keys.list_keys(s, ws())
    return render_template("dashboard/keys.html", rows=rows, scopes=keys.SCOPES)


@bp.post("/keys")
def create_key() -> ResponseReturnValue:
    scope = request.form.get("scope", "")
    name = request.form.get("name", "").strip()[:200] or None
    if scope not in keys.SCOPES:
        notice("Choose the key's scope: ingest, check or admin.", "error")
        return redirect(url_for("dashboard.api_keys"))
    if name and "\x00" in name:
        abort(400, description="The name must not contain NUL characters.")
    with SessionLocal.begin() as s:
        row, plain = keys.create_key(s, ws(), scope, name=name)
    # Rendered, not redirected: the key is shown this once and never stored in clear.
    return render_template("dashboard/key_created.html", row=row, plain=plain)


def _key_or_404(session: Any, key_id: int) -> Any:
    row = next((k for k in keys.list_keys(session, ws()) if k.id == key_id), None)
    if row is None:
        abort(404, description=f"No API key {key_id} in this workspace.")
    return row


@bp.get("/keys/<int:key_id>/revoke")
def revoke_key_confirm(key_id: int) -> ResponseReturnValue:
    with SessionLocal() as s:
        row = _key_or_404(s, key_id)
    return render_template("dashboard/key_revoke.html", row=row)


@bp.post("/keys/<int:key_id>/revoke")
def revoke_key(key_id: int) -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        if not keys.revoke_key(s, ws(), key_id):
            abort(404, description=f"No API key {key_id} in this workspace.")
    auth.clear_cache()  # at once in this process, within the key cache TTL in others
    notice(f"API key {key_id} revoked.")
    return redirect(url_for("dashboard.api_keys"))


# --- workspace settings and billing imports ---------------------------------------------------------


@bp.get("/settings")
def settings_page() -> ResponseReturnValue:
    from kana.dashboard.overview import job_state

    with SessionLocal() as s:
        workspace = s.get(Workspace, ws())
    job_id = request.args.get("job")
    return render_template("dashboard/settings.html", workspace=workspace, providers=keys.BILLING_PROVIDERS,
                           job=job_state(job_id) if job_id else None)


def _text_field(name: str, limit: int) -> str | None:
    value = request.form.get(name, "").strip()
    if "\x00" in value:
        abort(400, description=f"{name} must not contain NUL characters.")
    return value[:limit] or None


@bp.post("/settings")
def save_settings() -> ResponseReturnValue:
    provider = request.form.get("billing_provider", "") or None
    if provider is not None and provider not in keys.BILLING_PROVIDERS:
        abort(400, description="Unknown billing provider.")
    name = _text_field("name", 200)
    if name is None:
        notice("The workspace name must not be blank.", "error")
        return redirect(url_for("dashboard.settings_page"))
    with SessionLocal.begin() as s:
        row = s.get(Workspace, ws())
        row.name = name
        row.billing_provider = provider
        row.chargebee_site = _text_field("chargebee_site", 200)
        # Secrets are write-only: a blank field keeps the stored one; the checkbox removes it.
        for secret in ("stripe_api_key", "chargebee_api_key"):
            value = _text_field(secret, 500)
            if request.form.get(f"clear_{secret}"):
                setattr(row, secret, None)
            elif value is not None:
                setattr(row, secret, value)
    # Cached principals carry billing_provider: the receiver validates against the new one at once.
    auth.clear_cache()
    notice("Settings saved.")
    return redirect(url_for("dashboard.settings_page"))


@bp.post("/settings/import/<any(stripe, chargebee):provider>")
def billing_import_start(provider: str) -> ResponseReturnValue:
    rt = runtime()
    workspace_id = ws()
    with SessionLocal() as s:
        try:
            customers.credentials(s, workspace_id, provider, rt.settings)
        except customers.ImportFailed as exc:
            notice(str(exc), "error")
            return redirect(url_for("dashboard.settings_page"))
    try:
        job_id = import_jobs.enqueue_billing(rt.queue, workspace_id, provider)
    except RedisError:
        notice(UNREACHABLE, "error")
        return redirect(url_for("dashboard.settings_page"))
    return redirect(url_for("dashboard.settings_page", job=job_id))
