"""Admin API for operations (SPEC §6, §8, §10): flags, CSV import/export, billing imports.

Long work (flag refreshes, imports) runs as RQ jobs: the endpoint answers 202
with the ``job_id`` (``GET /api/v1/jobs/{job_id}`` follows it). Each request
commits its database work before it enqueues, so a worker never looks for a
row that isn't there yet.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from redis.exceptions import RedisError
from sqlalchemy import select

from jobs import flags as flag_jobs
from jobs import imports as import_jobs
from kana import auth
from kana.db import SessionLocal, read_only
from kana.domain import flags
from kana.errors import ApiError, unavailable
from kana.imports import csvfile, customers
from kana.models import CsvImport

bp = Blueprint("ops_api", __name__, url_prefix="/api/v1")


bp.before_request(auth.require_admin)


def _runtime() -> Any:
    return current_app.extensions["kana"]


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "invalid_request", f"{name} must be a whole number.",
                       errors={name: "Not a whole number."}) from None
    if not low <= value <= high:
        raise ApiError(400, "invalid_request", f"{name} must be between {low} and {high}.",
                       errors={name: f"Must be between {low} and {high}."})
    return value


def _flag_arg() -> str | None:
    flag = request.args.get("flag") or None
    if flag is not None and flag not in (*flags.FLAGS, flags.ANY):
        choices = ", ".join((*flags.FLAGS, flags.ANY))
        raise ApiError(400, "invalid_request", f"Unknown flag {flag!r}; use one of {choices}.",
                       errors={"flag": f"Must be one of {choices}."})
    return flag


# --- flags -----------------------------------------------------------------------


@bp.get("/flags")
def get_flags() -> ResponseReturnValue:
    limit = _int_arg("groups_limit", flags.GROUPS_LIMIT, 1, flags.MAX_GROUPS_LIMIT)
    with SessionLocal() as s:
        body = flags.summary(s, auth.workspace_id(), groups_limit=limit,
                             after=request.args.get("groups_cursor") or None)
    return jsonify(body)


@bp.post("/flags/refresh")
def refresh_flags() -> ResponseReturnValue:
    try:
        job_id = flag_jobs.enqueue_refresh(_runtime().queue, auth.workspace_id())
    except RedisError as exc:
        raise unavailable(exc) from None
    return jsonify({"job_id": job_id}), 202


# --- CSV ---------------------------------------------------------------------------


@bp.get("/exports/users.csv")
def export_users() -> ResponseReturnValue:
    flag = _flag_arg()
    workspace_id = auth.workspace_id()

    def generate() -> Iterator[str]:
        # Its own session: the response body is produced after this view returns.
        with SessionLocal() as s:
            yield from csvfile.export_lines(s, workspace_id, flag=flag)

    name = f"users-{flag}.csv" if flag else "users.csv"
    return Response(generate(), mimetype="text/csv", content_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})


def _upload() -> tuple[str | None, bytes]:
    limit = csvfile.MAX_BYTES
    too_big = ApiError(413, "file_too_large", f"The file is larger than {limit // (1024 * 1024)} MB; "
                       "split it into smaller files.", errors={"file": "Too large."})
    # Refuse before reading (and spooling) a body that can't be accepted anyway.
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise too_big
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(400, "invalid_request", "Send the CSV as multipart/form-data in a field named 'file'.",
                       errors={"file": "Missing."})
    data = upload.stream.read(limit + 1)
    if len(data) > limit:
        raise too_big
    return upload.filename or None, data


@bp.post("/imports/csv")
def import_csv() -> ResponseReturnValue:
    filename, data = _upload()
    try:
        csvfile.parse(data)  # file-level problems are answered now, not found later by a job
    except csvfile.CsvError as exc:
        errors: dict[str, Any] = {"file": exc.message}
        if exc.line is not None:
            errors["line"] = exc.line
        raise ApiError(400, "invalid_csv", exc.message, errors=errors) from None
    workspace_id = auth.workspace_id()
    job_id = f"csv-import-{uuid.uuid4().hex}"
    with SessionLocal.begin() as s:
        import_id = csvfile.create_import(s, workspace_id, filename, job_id).id
    rt = _runtime()
    try:
        import_jobs.enqueue_csv(rt.queue, rt.redis, import_id, job_id, data, workspace_id=workspace_id,
                                actor=auth.actor())
    except RedisError as exc:
        csvfile.finish(SessionLocal, import_id, "failed", "The job queue was unreachable; upload the file again.")
        raise unavailable(exc) from None
    return jsonify({"job_id": job_id, "import_id": import_id}), 202


@bp.get("/imports/csv")
def list_csv_imports() -> ResponseReturnValue:
    limit = _int_arg("limit", 20, 1, 100)
    with SessionLocal() as s:
        recent = csvfile.recent_imports(s, auth.workspace_id(), limit)
        body = {"imports": [csvfile.import_json(i, report=False) for i in recent]}
    return jsonify(body)


@bp.get("/imports/csv/<int:import_id>")
def get_csv_import(import_id: int) -> ResponseReturnValue:
    with read_only(SessionLocal()) as s:
        imp = s.scalar(select(CsvImport).where(CsvImport.id == import_id,
                                               CsvImport.workspace_id == auth.workspace_id()))
        if imp is None:
            raise ApiError(404, "not_found", f"No CSV import {import_id} in this workspace.")
        body = csvfile.import_json(imp)
    return jsonify(body)


# --- billing imports ---------------------------------------------------------------------


def _billing_import(provider: str) -> ResponseReturnValue:
    rt = _runtime()
    workspace_id = auth.workspace_id()
    with SessionLocal() as s:
        try:
            customers.credentials(s, workspace_id, provider, rt.settings)
        except customers.ImportFailed as exc:
            raise ApiError(400, "not_configured", str(exc)) from None
    try:
        job_id = import_jobs.enqueue_billing(rt.queue, workspace_id, provider)
    except RedisError as exc:
        raise unavailable(exc) from None
    return jsonify({"job_id": job_id}), 202


@bp.post("/imports/stripe")
def import_stripe() -> ResponseReturnValue:
    return _billing_import("stripe")


@bp.post("/imports/chargebee")
def import_chargebee() -> ResponseReturnValue:
    return _billing_import("chargebee")


# --- OpenAPI -------------------------------------------------------------------------------

_ERROR = {
    "type": "object",
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "errors": {"type": "object"}},
    "required": ["code", "message"],
}
_JOB = {"type": "object", "properties": {"job_id": {"type": "string"}}, "required": ["job_id"]}
_FLAG_PARAM = {
    "name": "flag", "in": "query", "required": False,
    "schema": {"type": "string", "enum": [*flags.FLAGS, flags.ANY]},
    "description": "Only users flagged so at the last refresh (any: either flag).",
}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "Invalid request", 401: "Missing, unknown or revoked API key", 403: "Not an admin key",
            404: "Not found", 413: "File larger than 50 MB", 503: "Job queue unreachable"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _accepted(description: str, schema: dict[str, Any] = _JOB) -> dict[str, Any]:
    return {"202": {"description": description, "content": {"application/json": {"schema": schema}}}}


_IMPORT = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "status": {"type": "string", "enum": ["queued", "running", "finished", "failed"]},
        "filename": {"type": "string", "nullable": True},
        "job_id": {"type": "string"},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        **{k: {"type": "integer"} for k in ("total", "processed", "created", "updated", "merged", "unchanged",
                                            "failed")},
        "error": {"type": "string", "nullable": True, "description": "Why the file as a whole was refused."},
        "report": {
            "type": "array",
            "description": "Line-numbered rows that were created, updated, merged or failed (capped).",
            "items": {"type": "object", "properties": {
                "line": {"type": "integer"}, "status": {"type": "string"}, "kana_id": {"type": "integer"},
                "actions": {"type": "array", "items": {"type": "string"}},
                "errors": {"type": "object", "additionalProperties": {"type": "string"}}}},
        },
        "report_truncated": {"type": "boolean"},
        "created_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": "string", "format": "date-time", "nullable": True},
    },
}

OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/flags": {
        "get": {
            "operationId": "getFlags",
            "summary": "Flag counts and duplicate-email groups as of the last refresh",
            "tags": ["flags"],
            "parameters": [
                {"name": "groups_limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                                    "maximum": flags.MAX_GROUPS_LIMIT}},
                {"name": "groups_cursor", "in": "query", "schema": {"type": "string"},
                 "description": "duplicate_email.next_cursor of the previous page."},
            ],
            "responses": {
                "200": {"description": "Flags", "content": {"application/json": {"schema": {
                    "type": "object",
                    "properties": {
                        "missing_billing_id": {"type": "object", "properties": {"count": {"type": "integer"}}},
                        "duplicate_email": {"type": "object", "properties": {
                            "count": {"type": "integer"},
                            "groups": {"type": "array", "items": {"type": "object", "properties": {
                                "email": {"type": "string"},
                                "kana_ids": {"type": "array", "items": {"type": "integer"}}}}},
                            "groups_total": {"type": "integer"},
                            "next_cursor": {"type": "string", "nullable": True}}},
                        "refreshed_at": {"type": "string", "format": "date-time", "nullable": True},
                    }}}}},
                **_errors(400, 401, 403),
            },
        }
    },
    "/api/v1/flags/refresh": {
        "post": {"operationId": "refreshFlags", "summary": "Refresh the workspace's flags now (a job)",
                 "tags": ["flags"], "responses": {**_accepted("Refresh job enqueued"), **_errors(401, 403, 503)}}
    },
    "/api/v1/exports/users.csv": {
        "get": {
            "operationId": "exportUsersCsv",
            "summary": "All users (or the flagged ones) as CSV, streamed",
            "tags": ["csv"],
            "parameters": [_FLAG_PARAM],
            "responses": {
                "200": {"description": "kana_id,user_id,name,email,billing_id,created_at (UTF-8; cells that "
                                       "would start a formula are prefixed with ')",
                        "content": {"text/csv": {"schema": {"type": "string"}}}},
                **_errors(400, 401, 403),
            },
        }
    },
    "/api/v1/imports/csv": {
        "post": {
            "operationId": "importCsv",
            "summary": "Import users from CSV (the export's format; any subset of its columns, header required)",
            "tags": ["csv"],
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"]}}}},
            "responses": {
                **_accepted("Import job enqueued", {"type": "object", "properties": {
                    "job_id": {"type": "string"}, "import_id": {"type": "integer"}}}),
                **_errors(400, 401, 403, 413, 503),
            },
        },
        "get": {
            "operationId": "listCsvImports",
            "summary": "Recent CSV imports",
            "tags": ["csv"],
            "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 100}}],
            "responses": {"200": {"description": "Imports", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"imports": {"type": "array", "items": _IMPORT}}}}}},
                **_errors(401, 403)},
        },
    },
    "/api/v1/imports/csv/{import_id}": {
        "get": {
            "operationId": "getCsvImport",
            "summary": "A CSV import's progress and line-numbered report",
            "tags": ["csv"],
            "parameters": [{"name": "import_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {"200": {"description": "The import", "content": {"application/json": {
                "schema": _IMPORT}}}, **_errors(401, 403, 404)},
        }
    },
    "/api/v1/imports/stripe": {
        "post": {
            "operationId": "importStripe",
            "summary": "Import the workspace's Stripe customers as unclaimed users (a job; result counts "
                       "created/updated/unchanged)",
            "tags": ["billing"],
            "responses": {**_accepted("Import job enqueued"), **_errors(400, 401, 403, 503)},
        }
    },
    "/api/v1/imports/chargebee": {
        "post": {
            "operationId": "importChargebee",
            "summary": "Import the workspace's Chargebee customers as unclaimed users (a job)",
            "tags": ["billing"],
            "responses": {**_accepted("Import job enqueued"), **_errors(400, 401, 403, 503)},
        }
    },
}
