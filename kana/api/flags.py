"""Flags (SPEC §6): users without a billing id, users sharing an email; refreshed by a job."""

from __future__ import annotations

from flask import jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields

from kana import auth
from kana.api.common import Queued, StrictSchema, bounded_int, bp, doc
from kana.db import SessionLocal
from kana.domain import flags
from kana.runtime import current
from kana.services import flags as flag_actions


class FlagsQuery(StrictSchema):
    groups_limit = fields.Integer(metadata={"minimum": 1, "maximum": flags.MAX_GROUPS_LIMIT})
    groups_cursor = fields.String(metadata={"description": "duplicate_email.next_cursor of the previous page."})


class Count(Schema):
    count = fields.Integer()


class EmailGroup(Schema):
    email = fields.String()
    kana_ids = fields.List(fields.Integer())


class DuplicateEmail(Count):
    groups = fields.List(fields.Nested(EmailGroup))
    groups_total = fields.Integer()
    next_cursor = fields.String(allow_none=True)


class FlagsOut(Schema):
    missing_billing_id = fields.Nested(Count)
    duplicate_email = fields.Nested(DuplicateEmail)
    refreshed_at = fields.DateTime(allow_none=True)


@bp.get("/flags")
@doc("getFlags", "Flag counts and duplicate-email groups as of the last refresh", query=FlagsQuery,
     response=FlagsOut, errors=(400, 401, 403))
def get_flags() -> ResponseReturnValue:
    limit = bounded_int("groups_limit", flags.GROUPS_LIMIT, 1, flags.MAX_GROUPS_LIMIT)
    with SessionLocal() as s:
        result = flags.summary(s, auth.workspace_id(), groups_limit=limit,
                               after=request.args.get("groups_cursor") or None)
    return jsonify(result)


@bp.post("/flags/refresh")
@doc("refreshFlags", "Refresh the workspace's flags now (a job)", status=202, response=Queued, errors=(401, 403, 503))
def refresh_flags() -> ResponseReturnValue:
    return jsonify({"job_id": flag_actions.refresh(current(), auth.workspace_id())}), 202
