"""Background jobs (reprocessing, flag refreshes, imports): status and progress."""

from __future__ import annotations

from flask import jsonify
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields

from kana import auth, jobstate
from kana.api.common import bp, doc
from kana.errors import NotFound
from kana.runtime import current


class JobOut(Schema):
    id = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": ["queued", "started", "finished", "failed"]})
    progress = fields.Float(required=True, metadata={"minimum": 0, "maximum": 1})
    result = fields.Raw(metadata={"description": "the job's return value, when finished"})
    error = fields.String(metadata={"description": "why it failed, when failed"})
    enqueued_at = fields.DateTime(allow_none=True)
    ended_at = fields.DateTime(allow_none=True)


@bp.get("/jobs/<job:job_id>")
@doc("getJob", "Status and progress of a background job", response=JobOut)
def job_status(job_id: str) -> ResponseReturnValue:
    job = jobstate.workspace_job(current().redis, job_id, auth.workspace_id())
    if job is None:
        raise NotFound(f"No job {job_id!r} (unknown, another workspace's, or its result has expired).")
    state = jobstate.describe(job)
    return jsonify({k: state[k] for k in JobOut().fields if k in state})
