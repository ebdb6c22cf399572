"""Mapping rules (SPEC §7, §10): CRUD, and a reprocessing job on every change.

Creating or changing a rule commits first, then queues the reprocessing of the
workspace's stored unmapped events and answers with that job's id; its
progress is at ``GET /api/v1/jobs/{job_id}``.
"""

from __future__ import annotations

from flask import jsonify, url_for
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields

from kana import auth
from kana.api.common import Queued, bp, doc, json_object
from kana.api.features import ReprocessJob, with_hint
from kana.domain.rules import RuleSchema
from kana.runtime import current
from kana.serializers import RuleOut
from kana.services import rules as rule_actions

RULE_ERRORS = (400, 401, 403, 404, 503)


class RuleList(Schema):
    rules = fields.List(fields.Nested(RuleOut), required=True)


class RuleWithJob(RuleOut, ReprocessJob):
    class Meta(RuleOut.Meta):
        fields = (*RuleOut.Meta.fields, "job_id", "reprocess_error")


@bp.post("/rules")
@doc("createRule", "Create a mapping rule and reprocess stored unmapped events", body=RuleSchema, status=201,
     response=RuleWithJob, errors=RULE_ERRORS)
def create_rule() -> ResponseReturnValue:
    result = rule_actions.create(current(), auth.workspace_id(), json_object())
    return jsonify(with_hint(result)), 201, {"Location": url_for("api.get_rule", rule_id=result["id"])}


@bp.get("/rules")
@doc("listRules", "List mapping rules in priority order", response=RuleList, errors=(401, 403))
def list_rules() -> ResponseReturnValue:
    return jsonify({"rules": rule_actions.listed(auth.workspace_id())})


@bp.get("/rules/<id:rule_id>")
@doc("getRule", "Get a rule", response=RuleOut, errors=(401, 403, 404))
def get_rule(rule_id: int) -> ResponseReturnValue:
    return jsonify(rule_actions.get(auth.workspace_id(), rule_id))


@bp.patch("/rules/<id:rule_id>")
@doc("updateRule", "Change a rule (conditions are replaced) and reprocess", body=RuleSchema,
     response=RuleWithJob, errors=RULE_ERRORS)
def update_rule(rule_id: int) -> ResponseReturnValue:
    result = rule_actions.update(current(), auth.workspace_id(), rule_id, json_object())
    return jsonify(with_hint(result))


@bp.delete("/rules/<id:rule_id>")
@doc("deleteRule", "Delete a rule (usage it recorded stays)", status=204, errors=(401, 403, 404))
def delete_rule(rule_id: int) -> ResponseReturnValue:
    rule_actions.delete(auth.workspace_id(), rule_id)
    return "", 204


@bp.post("/rules/reprocess")
@doc("reprocessUnmapped", "Queue reprocessing of stored unmapped events", status=202, response=Queued,
     errors=(401, 403, 503))
def reprocess_now() -> ResponseReturnValue:
    """Queue a reprocessing pass by hand (e.g. after a Redis outage hid one)."""
    return jsonify({"job_id": rule_actions.request_reprocess(current(), auth.workspace_id())}), 202
