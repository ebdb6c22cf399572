"""CSV export/import, events (unmapped, failed), API keys and workspace settings."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

from flask import Response, abort, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from kana.dashboard.common import PAGE_SIZE, actor, back_to, bp, int_arg, notice, ws
from kana.db import SessionLocal, read_only
from kana.domain import flags, keys
from kana.imports import csvfile
from kana.models import CsvImport, DeadLetter, Event, Workspace
from kana.paging import keyset
from kana.runtime import current
from kana.services import events as event_actions
from kana.services import imports as import_actions
from kana.services import keys as key_actions
from kana.services import workspace as workspace_actions

EVENT_STATUSES = ("unmapped", "mapped", "processed")


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
    back_to("dashboard.csv_page")
    try:
        import_id, _ = import_actions.start_csv(current(), ws(), upload.filename, data, actor=actor())
    except csvfile.CsvError as exc:
        # Named with the file, as the operator chose it.
        where = f" (line {exc.line})" if exc.line is not None else ""
        notice(f"{upload.filename}: {exc.message}{where}", "error")
        return redirect(url_for("dashboard.csv_page"))
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


@bp.get("/csv/imports/<id:import_id>")
def csv_import_page(import_id: int) -> ResponseReturnValue:
    with SessionLocal() as s:
        imp = _import_or_404(s, import_id)
        body = csvfile.import_json(imp)
    report = body["report"]
    # Failed rows are what the operator has to act on: they come first.
    shown = sorted(report, key=lambda r: (r.get("status") != "failed", r.get("line", 0)))[:REPORT_ROWS_SHOWN]
    return render_template("dashboard/csv_import.html", imp=body, summary=import_summary(body), shown=shown,
                           done=body["status"] in ("finished", "failed"))


@bp.get("/csv/imports/<id:import_id>/report.csv")
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


@bp.get("/csv/imports/<id:import_id>.json")
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
    with SessionLocal() as s:
        rows, older = keyset(s, stmt, Event.id, after=before, limit=PAGE_SIZE, descending=True)
    return render_template("dashboard/events.html", rows=rows, status=status, statuses=EVENT_STATUSES,
                           older=older, paged=before is not None)


@bp.get("/events/failed")
def dead_letters() -> ResponseReturnValue:
    before = int_arg("before")
    stmt = select(DeadLetter).where(DeadLetter.workspace_id == ws())
    with SessionLocal() as s:
        rows, older = keyset(s, stmt, DeadLetter.id, after=before, limit=PAGE_SIZE, descending=True)
    return render_template("dashboard/dead_letters.html", rows=rows, older=older, paged=before is not None)


@bp.post("/events/failed/<id:dead_letter_id>/retry")
def retry_dead_letter(dead_letter_id: int) -> ResponseReturnValue:
    """Put a failed call back on its partition queue, as ``POST /api/v1/events/failed/{id}/retry`` does."""
    back_to("dashboard.dead_letters")
    message_id = event_actions.retry_dead_letter(current(), ws(), dead_letter_id)
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
    created = key_actions.create(ws(), scope, name)
    # Rendered, not redirected: the key is shown this once and never stored in clear.
    return render_template("dashboard/key_created.html", row=created, plain=created["api_key"])


def _key_or_404(session: Any, key_id: int) -> Any:
    row = next((k for k in keys.list_keys(session, ws()) if k.id == key_id), None)
    if row is None:
        abort(404, description=f"No API key {key_id} in this workspace.")
    return row


@bp.get("/keys/<id:key_id>/revoke")
def revoke_key_confirm(key_id: int) -> ResponseReturnValue:
    with SessionLocal() as s:
        row = _key_or_404(s, key_id)
    return render_template("dashboard/key_revoke.html", row=row)


@bp.post("/keys/<id:key_id>/revoke")
def revoke_key(key_id: int) -> ResponseReturnValue:
    key_actions.revoke(ws(), key_id, redis=current().redis)
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
    changes: dict[str, object] = {"name": name, "billing_provider": provider,
                                  "chargebee_site": _text_field("chargebee_site", 200),
                                  "keep_ip": bool(request.form.get("keep_ip"))}
    # Secrets are write-only: a blank field keeps the stored one; the checkbox removes it.
    for secret in ("stripe_api_key", "chargebee_api_key", "segment_shared_secret"):
        value = _text_field(secret, 500)
        if request.form.get(f"clear_{secret}"):
            changes[secret] = None
        elif value is not None:
            changes[secret] = value
    workspace_actions.update(ws(), changes)
    notice("Settings saved.")
    return redirect(url_for("dashboard.settings_page"))


@bp.post("/settings/import/<any(stripe, chargebee):provider>")
def billing_import_start(provider: str) -> ResponseReturnValue:
    back_to("dashboard.settings_page")
    job_id = import_actions.start_billing(current(), ws(), provider)
    return redirect(url_for("dashboard.settings_page", job=job_id))
