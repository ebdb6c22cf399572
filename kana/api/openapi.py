"""The OpenAPI 3 document of the admin API, served at ``/api/v1/openapi.json``.

Request schemas are the very marshmallow schemas ``kana.api`` validates with,
so the document cannot drift from what the API accepts; response schemas
below mirror ``kana.views``. tests/test_api.py checks that every route of the
blueprint is described here.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from kana.api import entitlements as api_entitlements
from kana.api import ops as api_ops
from kana.api import plans as api_plans
from kana.api import rules as api_rules
from kana.api import users as api
from kana.api import webhook as api_webhook
from kana.domain import features, ledger

PREFIX = api.bp.url_prefix or ""
INT_PARAMS = {"kana_id", "dead_letter_id", "key_id"}


# --- response shapes (documentation only; kana.views builds the JSON) --------------


def _nullable_str(**kwargs: Any) -> fields.String:
    return fields.String(allow_none=True, **kwargs)


class Error(Schema):
    code = fields.String(required=True, metadata={"example": "invalid_request"})
    message = fields.String(required=True)
    errors = fields.Dict(metadata={"description": "field name -> list of problems"})


class UserOut(Schema):
    kana_id = fields.Integer(required=True)
    user_id = _nullable_str(required=True, metadata={"description": "null for an unclaimed user"})
    email = _nullable_str(required=True)
    name = _nullable_str(required=True)
    billing_id = _nullable_str(required=True)
    billing_provider = _nullable_str(required=True)
    source = fields.String(required=True, metadata={"enum": ["segment", "stripe", "chargebee", "csv", "api"]})
    group_id = _nullable_str()
    group_name = _nullable_str()
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class UserDetail(UserOut):
    aliases = fields.List(fields.String(), required=True, metadata={"description": "user_ids merged into this user"})


class UserPage(Schema):
    users = fields.List(fields.Nested(UserOut), required=True)
    next_cursor = _nullable_str(required=True)


class SeriesPoint(Schema):
    start = fields.DateTime(required=True)
    total = fields.Float(required=True)


class UsageOut(Schema):
    feature = fields.String(required=True)
    kana_id = fields.Integer()
    total = fields.Float(required=True)
    window = fields.String(metadata={"enum": list(ledger.WINDOWS)})
    series = fields.List(fields.Nested(SeriesPoint), metadata={"description": "only when window is given"})


class TopUser(Schema):
    kana_id = fields.Integer(required=True)
    user_id = _nullable_str(required=True)
    total = fields.Float(required=True)


class TopUsageOut(Schema):
    feature = fields.String(required=True)
    total = fields.Float(required=True)
    users = fields.List(fields.Nested(TopUser), required=True)


class FeatureOut(Schema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": list(features.TYPES)})
    created_at = fields.DateTime(required=True)


class FeatureList(Schema):
    features = fields.List(fields.Nested(FeatureOut), required=True)


class EventOut(Schema):
    id = fields.Integer(required=True)
    message_id = fields.String(required=True)
    type = fields.String(required=True)
    name = _nullable_str()
    user_id = fields.String(required=True)
    kana_id = fields.Integer(allow_none=True)
    status = fields.String(required=True, metadata={"enum": ["unmapped", "mapped", "processed"]})
    reason = _nullable_str()
    feature_id = _nullable_str()
    properties = fields.Dict()
    timestamp = fields.DateTime()
    received_at = fields.DateTime()
    processed_at = fields.DateTime()


class DeadLetterOut(Schema):
    id = fields.Integer(required=True)
    status = fields.String(required=True, metadata={"enum": ["failed"]})
    message_id = fields.String(required=True)
    user_id = _nullable_str()
    error = fields.String(required=True)
    attempts = fields.Integer(required=True)
    payload = fields.Dict(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime()


class Requeued(Schema):
    requeued = fields.Boolean(required=True)
    message_id = fields.String()


class Stats(Schema):
    events_received = fields.Integer(required=True)
    events_processed = fields.Integer(required=True)
    events_pending = fields.Integer(required=True)
    events_failed = fields.Integer(required=True)


class JobOut(Schema):
    id = fields.String(required=True)
    status = fields.String(required=True, metadata={"enum": ["queued", "started", "finished", "failed"]})
    progress = fields.Float(required=True, metadata={"minimum": 0, "maximum": 1})
    result = fields.Raw(metadata={"description": "the job's return value, when finished"})
    error = fields.String(metadata={"description": "why it failed, when failed"})
    enqueued_at = fields.DateTime(allow_none=True)
    ended_at = fields.DateTime(allow_none=True)


class WorkspaceOut(Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    billing_provider = _nullable_str(required=True, metadata={"enum": ["stripe", "chargebee", None]})
    stripe_api_key_set = fields.Boolean(required=True)
    chargebee_site = _nullable_str(required=True)
    chargebee_api_key_set = fields.Boolean(required=True)


class AuditOut(Schema):
    id = fields.Integer(required=True)
    action = fields.String(required=True, metadata={"enum": ["merge", "delete", "gdpr_delete", "alias"]})
    trigger = fields.String(required=True)
    actor = _nullable_str()
    survivor_kana_id = fields.Integer(allow_none=True)
    kana_ids = fields.List(fields.Integer())
    detail = fields.Dict()
    at = fields.DateTime(required=True)


class AuditPage(Schema):
    audit = fields.List(fields.Nested(AuditOut), required=True)
    next_cursor = _nullable_str(required=True)


class KeyOut(Schema):
    id = fields.Integer(required=True)
    prefix = fields.String(required=True)
    scope = fields.String(required=True, metadata={"enum": ["ingest", "admin"]})
    name = _nullable_str()
    created_at = fields.DateTime(required=True)
    revoked_at = fields.DateTime(allow_none=True)


class KeyCreated(KeyOut):
    api_key = fields.String(required=True, metadata={"description": "shown once; only its hash is stored"})


class KeyList(Schema):
    keys = fields.List(fields.Nested(KeyOut), required=True)


# --- operations -----------------------------------------------------------------------

NO_CONTENT = "no content"

# (path under the prefix, method, operationId, summary, request parts, success status, response schema)
OPERATIONS: list[tuple[str, str, str, str, dict[str, Any], int, Any]] = [
    ("/users", "get", "listUsers", "List or find users (keyset-paginated by kana_id)",
     {"query": api.UserListQuery}, 200, UserPage),
    ("/users", "post", "createUser", "Create a user (source api), claimed or unclaimed",
     {"body": api.UserCreate}, 201, UserDetail),
    ("/users/merge", "post", "mergeUsers", "Merge users into the one created first",
     {"body": api.MergeRequest}, 200, UserDetail),
    ("/users/{kana_id}", "get", "getUser", "A user with its aliases", {}, 200, UserDetail),
    ("/users/{kana_id}", "delete", "deleteUser", "Delete a user with its events, usage and aliases",
     {}, 204, NO_CONTENT),
    ("/users/{kana_id}/usage", "get", "getUserUsage", "A user's usage of a feature: total and series",
     {"query": api.UsageQuery}, 200, UsageOut),
    ("/usage", "get", "topUsage", "Top users of a feature", {"query": api.TopUsageQuery}, 200, TopUsageOut),
    ("/features", "get", "listFeatures", "List features", {}, 200, FeatureList),
    ("/features", "post", "createFeature", "Create a feature", {"body": api.FeatureCreate}, 201, FeatureOut),
    ("/features/{feature_id}", "get", "getFeature", "A feature", {}, 200, FeatureOut),
    ("/features/{feature_id}", "patch", "updateFeature", "Rename or retype a feature",
     {"body": api.FeatureUpdate}, 200, FeatureOut),
    ("/features/{feature_id}", "delete", "deleteFeature", "Delete a feature (with force: and its usage)",
     {"query": api.FeatureDeleteQuery}, 204, NO_CONTENT),
    ("/events", "get", "listEvents", "Stored events by status; status=failed lists dead letters",
     {"query": api.EventListQuery}, 200, "EventPage"),
    ("/events/failed/{dead_letter_id}/retry", "post", "retryFailedEvent", "Requeue a failed call",
     {}, 202, Requeued),
    ("/stats", "get", "getStats", "Event counters of the workspace", {}, 200, Stats),
    ("/jobs/{job_id}", "get", "getJob", "Status and progress of a background job", {}, 200, JobOut),
    ("/workspace", "get", "getWorkspace", "Workspace settings (secrets are never returned)",
     {}, 200, WorkspaceOut),
    ("/workspace", "patch", "updateWorkspace", "Change workspace settings",
     {"body": api.WorkspaceUpdate}, 200, WorkspaceOut),
    ("/audit", "get", "listAudit", "Audit log of merges, deletes and aliases (newest first)",
     {"query": api.PageQuery}, 200, AuditPage),
    ("/keys", "get", "listKeys", "API keys of the workspace", {}, 200, KeyList),
    ("/keys", "post", "createKey", "Create an API key (shown once)", {"body": api.KeyCreate}, 201, KeyCreated),
    ("/keys/{key_id}", "delete", "revokeKey", "Revoke an API key", {}, 204, NO_CONTENT),
]

ERRORS = {
    "400": ("InvalidRequest", "Invalid input; `errors` names each offending field"),
    "401": ("Unauthorized", "Missing, unknown or revoked API key"),
    "403": ("Forbidden", "An ingest key; the admin API needs an admin key"),
    "404": ("NotFound", "No such resource in this workspace"),
    "409": ("Conflict", "The change conflicts with existing data"),
    "503": ("Unavailable", "Redis is unreachable; retry"),
}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {
            "in": "path",
            "name": name,
            "required": True,
            "schema": {"type": "integer"} if name in INT_PARAMS else {"type": "string"},
        }
        for name in re.findall(r"{(\w+)}", path)
    ]


def _operation(operation_id: str, summary: str, parts: dict[str, Any], status: int, response: Any) -> dict:
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "parameters": []}
    if "query" in parts:
        op["parameters"].append({"in": "query", "schema": parts["query"]})
    if "body" in parts:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": parts["body"]}}}
    if response == NO_CONTENT:
        ok: dict[str, Any] = {"description": "Done"}
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": response}}}
    op["responses"] = {str(status): ok, **{code: name for code, (name, _) in ERRORS.items()}}
    return op


def build() -> APISpec:
    spec = APISpec(
        title="Kana admin API",
        version="1",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Users, usage, features, events and jobs of one workspace. "
            "Authenticate with the workspace's admin key: `Authorization: Bearer KEY` "
            "(or HTTP Basic with the key as user name, as Segment sends it)."
        },
        servers=[{"url": "/"}],
        security=[{"bearer": []}, {"basic": []}],
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("basic", {"type": "http", "scheme": "basic"})
    spec.components.schema("Error", schema=Error)
    for name, description in ERRORS.values():
        spec.components.response(
            name, {"description": description, "content": {"application/json": {"schema": "Error"}}}
        )
    for schema in (EventOut, DeadLetterOut):
        spec.components.schema(schema.__name__.removesuffix("Out") or schema.__name__, schema=schema)
    spec.components.schema("EventPage", {
        "type": "object",
        "required": ["events", "next_cursor"],
        "properties": {
            "events": {"type": "array", "items": {"oneOf": [
                {"$ref": "#/components/schemas/Event"}, {"$ref": "#/components/schemas/DeadLetter"}]}},
            "next_cursor": {"type": "string", "nullable": True},
        },
    })

    by_path: dict[str, dict[str, Any]] = {}
    for path, method, operation_id, summary, parts, status, response in OPERATIONS:
        by_path.setdefault(path, {})[method] = _operation(operation_id, summary, parts, status, response)
    for path, operations in by_path.items():
        spec.path(path=PREFIX + path, operations=operations, parameters=_path_parameters(path))
    # Rules and operations blueprints describe their own paths (full paths, under PREFIX).
    for extra in (api_rules.OPENAPI_PATHS, api_ops.OPENAPI_PATHS, api_plans.OPENAPI_PATHS,
                  api_entitlements.OPENAPI_PATHS, api_webhook.OPENAPI_PATHS):
        for path, item in extra.items():
            item = dict(item)
            spec.path(path=path, parameters=item.pop("parameters", None), operations=item)
    spec.path(path=PREFIX + "/openapi.json", operations={"get": {
        "operationId": "getOpenAPI", "summary": "This document", "security": [],
        "responses": {"200": {"description": "OpenAPI 3 document", "content": {"application/json": {}}}},
    }})
    return spec


@cache
def spec_dict() -> dict[str, Any]:
    """The document as a dict, built once per process."""
    return build().to_dict()
