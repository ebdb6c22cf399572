"""Admin API for mapping rules (SPEC §7, §10): CRUD, and reprocessing jobs on every change.

Creating or changing a rule commits first, then queues the reprocessing of the
workspace's stored unmapped events and answers with that job's id; its
progress is at ``GET /api/v1/jobs/{job_id}``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, jsonify, url_for
from flask.typing import ResponseReturnValue
from redis.exceptions import RedisError

from kana import auth
from kana.db import SessionLocal
from kana.domain import reprocess, rules
from kana.domain.ids import MAX_ID
from kana.errors import ApiError, json_object, unavailable

log = logging.getLogger(__name__)

bp = Blueprint("rules_api", __name__, url_prefix="/api/v1")



bp.before_request(auth.require_admin)


def _invalid(exc: rules.RuleError) -> ApiError:
    parts = [f"{'body' if k == '_schema' else k}: {' '.join(v)}" for k, v in exc.errors.items()]
    return ApiError(400, "invalid_request", "Invalid rule. " + "; ".join(parts), errors=exc.errors)


def _not_found(rule_id: int) -> ApiError:
    return ApiError(404, "not_found", f"No rule {rule_id} in this workspace.")


def _check_id(rule_id: int) -> None:
    if rule_id > MAX_ID:
        raise _not_found(rule_id)


def reprocess_job(workspace_id: int, why: str) -> dict[str, Any]:
    """``{"job_id"}`` of the reprocessing for a committed change (rules, or a new feature).

    A Redis outage must not turn a saved change into an error (the client would
    retry and create it twice): the answer says reprocessing was not queued.
    """
    try:
        return {"job_id": reprocess.enqueue(current_app.extensions["kana"].queue, workspace_id, why=why)}
    except RedisError as exc:
        log.warning("rule saved but reprocessing could not be queued: %s", exc)
        return {"job_id": None, "reprocess_error": "The queue (Redis) is unreachable: the change is saved, but "
                "reprocessing was not queued. Queue it with POST /api/v1/rules/reprocess."}


@bp.post("/rules")
def create_rule() -> ResponseReturnValue:
    data = json_object()
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        try:
            rule = rules.create_rule(s, ws, data)
        except rules.RuleError as exc:
            raise _invalid(exc) from None
        body = rules.to_dict(rule)
    body.update(reprocess_job(ws, f"rule {body['id']} created"))
    return jsonify(body), 201, {"Location": url_for("rules_api.get_rule", rule_id=body["id"])}


@bp.get("/rules")
def list_rules() -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        body = {"rules": [rules.to_dict(r) for r in rules.list_rules(s, auth.workspace_id())]}
    return jsonify(body)


@bp.get("/rules/<int:rule_id>")
def get_rule(rule_id: int) -> ResponseReturnValue:
    _check_id(rule_id)
    with SessionLocal.begin() as s:
        try:
            body = rules.to_dict(rules.get_rule(s, auth.workspace_id(), rule_id))
        except rules.RuleNotFound:
            raise _not_found(rule_id) from None
    return jsonify(body)


@bp.patch("/rules/<int:rule_id>")
def update_rule(rule_id: int) -> ResponseReturnValue:
    _check_id(rule_id)
    data = json_object()
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        try:
            body = rules.to_dict(rules.update_rule(s, ws, rule_id, data))
        except rules.RuleNotFound:
            raise _not_found(rule_id) from None
        except rules.RuleError as exc:
            raise _invalid(exc) from None
    body.update(reprocess_job(ws, f"rule {rule_id} changed"))
    return jsonify(body)


@bp.delete("/rules/<int:rule_id>")
def delete_rule(rule_id: int) -> ResponseReturnValue:
    _check_id(rule_id)
    with SessionLocal.begin() as s:
        try:
            rules.delete_rule(s, auth.workspace_id(), rule_id)
        except rules.RuleNotFound:
            raise _not_found(rule_id) from None
    return "", 204


@bp.post("/rules/reprocess")
def reprocess_now() -> ResponseReturnValue:
    """Queue a reprocessing pass by hand (e.g. after a Redis outage hid one)."""
    try:
        job_id = reprocess.enqueue(current_app.extensions["kana"].queue, auth.workspace_id(), why="requested")
    except RedisError as exc:
        raise unavailable(exc) from None
    return jsonify({"job_id": job_id}), 202


# --- OpenAPI 3 path items, merged into the document by kana/openapi.py ------------------

_ERROR = {"$ref": "#/components/schemas/Error"}
_CONDITION = {
    "type": "object",
    "required": ["property", "operator"],
    "additionalProperties": False,
    "properties": {
        "property": {"type": "string", "description": "Property name or dot path into nested properties, "
                     "e.g. plan.tier (digits index lists: items.0.sku)."},
        "operator": {"type": "string", "enum": list(rules.OPERATORS)},
        "value": {"description": "equals/not_equals: any JSON value; contains: a string (substring) or a scalar "
                  "(list membership); gt/gte/lt/lte: a number; in: a non-empty list of scalars; exists: optional "
                  "boolean (default true; false = absent or null)."},
    },
}
_RULE_INPUT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "feature_id": {"type": "string", "description": "An existing feature's id."},
        "event": {"type": "string", "description": "Event name (track) or page/screen name."},
        "type": {"type": "string", "enum": list(rules.CALL_TYPES), "nullable": True,
                 "description": "Call type; null (default) matches track, page and screen."},
        "conditions": {"type": "array", "items": _CONDITION, "maxItems": rules.MAX_CONDITIONS,
                       "description": "All must hold (AND)."},
        "delta_property": {"type": "string", "nullable": True,
                           "description": "Dot path of the amount; default properties.delta, else 1. A missing or "
                           "non-numeric amount makes the rule not match."},
        "priority": {"type": "integer", "default": rules.DEFAULT_PRIORITY,
                     "description": "Lower runs first; the first matching rule wins (ties: older rule)."},
        "enabled": {"type": "boolean", "default": True},
    },
}
_RULE = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        **_RULE_INPUT["properties"],
        "created_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
    },
}
_RULE_WITH_JOB = {
    "allOf": [_RULE, {"type": "object", "properties": {
        "job_id": {"type": "string", "nullable": True,
                   "description": "The reprocessing job (GET /api/v1/jobs/{job_id}); null if Redis was down."},
        "reprocess_error": {"type": "string"},
    }}],
}
_RULE_ID = {"name": "rule_id", "in": "path", "required": True, "schema": {"type": "integer"}}
_errors = {
    "400": {"description": "Invalid rule; `errors` names each field (e.g. conditions.0.operator).",
            "content": {"application/json": {"schema": _ERROR}}},
    "401": {"description": "Missing, unknown or revoked key."},
    "403": {"description": "Not an admin key."},
}

OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/rules": {
        "get": {
            "tags": ["rules"], "operationId": "listRules", "summary": "List mapping rules in priority order",
            "responses": {"200": {"description": "The rules", "content": {"application/json": {"schema": {
                "type": "object", "properties": {"rules": {"type": "array", "items": _RULE}}}}}}},
        },
        "post": {
            "tags": ["rules"], "operationId": "createRule",
            "summary": "Create a mapping rule and reprocess stored unmapped events",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                **_RULE_INPUT, "required": ["feature_id", "event"]}}}},
            "responses": {"201": {"description": "The rule and its reprocessing job",
                                  "content": {"application/json": {"schema": _RULE_WITH_JOB}}}, **_errors},
        },
    },
    "/api/v1/rules/{rule_id}": {
        "parameters": [_RULE_ID],
        "get": {"tags": ["rules"], "operationId": "getRule", "summary": "Get a rule",
                "responses": {"200": {"description": "The rule", "content": {"application/json": {"schema": _RULE}}},
                              "404": {"description": "No such rule in this workspace"}}},
        "patch": {
            "tags": ["rules"], "operationId": "updateRule",
            "summary": "Change a rule (conditions are replaced) and reprocess",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _RULE_INPUT}}},
            "responses": {"200": {"description": "The rule and its reprocessing job",
                                  "content": {"application/json": {"schema": _RULE_WITH_JOB}}},
                          "404": {"description": "No such rule in this workspace"}, **_errors},
        },
        "delete": {"tags": ["rules"], "operationId": "deleteRule", "summary": "Delete a rule (usage it recorded stays)",
                   "responses": {"204": {"description": "Deleted"},
                                 "404": {"description": "No such rule in this workspace"}}},
    },
    "/api/v1/rules/reprocess": {
        "post": {"tags": ["rules"], "operationId": "reprocessUnmapped",
                 "summary": "Queue reprocessing of stored unmapped events",
                 "responses": {"202": {"description": "The job", "content": {"application/json": {"schema": {
                     "type": "object", "properties": {"job_id": {"type": "string"}}}}}}}},
    },
}
