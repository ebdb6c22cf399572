"""CSV export and import of users, Stripe and Chargebee customer imports (SPEC §5, §8).

Imports run as RQ jobs: the endpoint answers 202 with the ``job_id``
(``GET /api/v1/jobs/{job_id}`` follows it; a CSV import also has its own report).
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response, jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate
from sqlalchemy import select

from kana import auth
from kana.api.common import Queued, StrictSchema, bp, doc, query
from kana.db import SessionLocal, read_only
from kana.domain import flags
from kana.errors import ApiError, NotFound
from kana.imports import csvfile
from kana.models import CsvImport
from kana.runtime import current
from kana.services import imports as import_actions


class ExportQuery(StrictSchema):
    flag = fields.String(load_default=None, validate=validate.OneOf([*flags.FLAGS, flags.ANY]), metadata={
        "description": "Only users flagged so at the last refresh (any: either flag)."})


class LimitQuery(StrictSchema):
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))


class ReportRow(Schema):
    line = fields.Integer()
    status = fields.String()
    kana_id = fields.Integer()
    actions = fields.List(fields.String())
    errors = fields.Dict(keys=fields.String(), values=fields.String())


class CsvImportOut(Schema):
    id = fields.Integer()
    status = fields.String(metadata={"enum": ["queued", "running", "finished", "failed"]})
    filename = fields.String(allow_none=True)
    job_id = fields.String()
    progress = fields.Float(metadata={"minimum": 0, "maximum": 1})
    total = fields.Integer()
    processed = fields.Integer()
    created = fields.Integer()
    updated = fields.Integer()
    merged = fields.Integer()
    unchanged = fields.Integer()
    failed = fields.Integer()
    error = fields.String(allow_none=True, metadata={"description": "Why the file as a whole was refused."})
    report = fields.List(fields.Nested(ReportRow), metadata={
        "description": "Line-numbered rows that were created, updated, merged or failed (capped)."})
    report_truncated = fields.Boolean()
    created_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)


class CsvImportList(Schema):
    imports = fields.List(fields.Nested(CsvImportOut))


class CsvStarted(Schema):
    job_id = fields.String(required=True)
    import_id = fields.Integer()


class Upload(Schema):
    file = fields.String(required=True, metadata={"format": "binary"})


@bp.get("/exports/users.csv")
@doc("exportUsersCsv", "All users (or the flagged ones) as CSV, streamed", query=ExportQuery,
     response="kana_id,user_id,name,email,billing_id,created_at (UTF-8; cells that would start a formula are "
              "prefixed with ')", media="text/csv", errors=(400, 401, 403))
def export_users() -> ResponseReturnValue:
    flag = query(ExportQuery)["flag"]
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
@doc("importCsv", "Import users from CSV (the export's format; any subset of its columns, header required)",
     body=Upload, upload=True, status=202, response=CsvStarted, errors=(400, 401, 403, 413, 503))
def import_csv() -> ResponseReturnValue:
    filename, data = _upload()
    import_id, job_id = import_actions.start_csv(current(), auth.workspace_id(), filename, data, actor=auth.actor())
    return jsonify({"job_id": job_id, "import_id": import_id}), 202


@bp.get("/imports/csv")
@doc("listCsvImports", "Recent CSV imports", query=LimitQuery, response=CsvImportList, errors=(400, 401, 403))
def list_csv_imports() -> ResponseReturnValue:
    limit = query(LimitQuery)["limit"]
    with SessionLocal() as s:
        recent = csvfile.recent_imports(s, auth.workspace_id(), limit)
        result = {"imports": [csvfile.import_json(i, report=False) for i in recent]}
    return jsonify(result)


@bp.get("/imports/csv/<id:import_id>")
@doc("getCsvImport", "A CSV import's progress and line-numbered report", response=CsvImportOut,
     errors=(401, 403, 404))
def get_csv_import(import_id: int) -> ResponseReturnValue:
    with read_only(SessionLocal()) as s:
        imp = s.scalar(select(CsvImport).where(CsvImport.id == import_id,
                                               CsvImport.workspace_id == auth.workspace_id()))
        if imp is None:
            raise NotFound(f"No CSV import {import_id} in this workspace.")
        result = csvfile.import_json(imp)
    return jsonify(result)


def _billing_import(provider: str) -> ResponseReturnValue:
    return jsonify({"job_id": import_actions.start_billing(current(), auth.workspace_id(), provider)}), 202


@bp.post("/imports/stripe")
@doc("importStripe", "Import the workspace's Stripe customers as unclaimed users (a job; result counts "
     "created/updated/unchanged)", status=202, response=Queued, errors=(400, 401, 403, 503))
def import_stripe() -> ResponseReturnValue:
    return _billing_import("stripe")


@bp.post("/imports/chargebee")
@doc("importChargebee", "Import the workspace's Chargebee customers as unclaimed users (a job)", status=202,
     response=Queued, errors=(400, 401, 403, 503))
def import_chargebee() -> ResponseReturnValue:
    return _billing_import("chargebee")
