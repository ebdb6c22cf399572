"""The workspace's settings and its audit log (SPEC §8, §10)."""

from __future__ import annotations

from flask import jsonify
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate
from sqlalchemy import select

from kana import auth
from kana.api.common import PageQuery, StrictSchema, body, bp, doc, no_nul, page, query
from kana.db import SessionLocal
from kana.domain import keys
from kana.models import Audit, Workspace
from kana.serializers import AuditOut, WorkspaceOut, audit_json, workspace_json
from kana.services import workspace as workspace_actions


class WorkspaceUpdate(StrictSchema):
    name = fields.String(validate=[no_nul, validate.Length(min=1, max=200)])
    billing_provider = fields.String(allow_none=True, validate=validate.OneOf(keys.BILLING_PROVIDERS))
    stripe_api_key = fields.String(allow_none=True, validate=[no_nul, validate.Length(max=500)])
    chargebee_site = fields.String(allow_none=True, validate=[no_nul, validate.Length(max=200)])
    chargebee_api_key = fields.String(allow_none=True, validate=[no_nul, validate.Length(max=500)])
    segment_shared_secret = fields.String(allow_none=True, validate=[no_nul, validate.Length(max=500)], metadata={
        "description": "Segment's shared secret: /segment/{workspace_id} then accepts requests signed with it "
                       "(X-Signature). Write-only; null or blank removes it."})
    keep_ip = fields.Boolean(metadata={"description": "keep context.ip of events (off by default)"})


class AuditPage(Schema):
    audit = fields.List(fields.Nested(AuditOut), required=True)
    next_cursor = fields.String(allow_none=True, required=True)


@bp.get("/workspace")
@doc("getWorkspace", "Workspace settings (secrets are never returned)", response=WorkspaceOut)
def get_workspace() -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        result = workspace_json(s.get(Workspace, auth.workspace_id()))
    return jsonify(result)


@bp.patch("/workspace")
@doc("updateWorkspace", "Change workspace settings", body=WorkspaceUpdate, response=WorkspaceOut)
def update_workspace() -> ResponseReturnValue:
    return jsonify(workspace_actions.update(auth.workspace_id(), body(WorkspaceUpdate)))


@bp.get("/audit")
@doc("listAudit", "Audit log of merges, deletes and aliases (newest first)", query=PageQuery, response=AuditPage)
def list_audit() -> ResponseReturnValue:
    args = query(PageQuery)
    with SessionLocal.begin() as s:
        stmt = select(Audit).where(Audit.workspace_id == auth.workspace_id())
        rows, cursor = page(s, stmt, Audit.id, args, descending=True)
        result = {"audit": [audit_json(r) for r in rows], "next_cursor": cursor}
    return jsonify(result)
