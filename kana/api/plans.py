"""Admin API for plans (SPEC §10, §11): CRUD, a user's plan, a user's entitlements."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from kana import auth
from kana.api.common import json_object
from kana.db import SessionLocal
from kana.domain import entitlements, features, identity, plans
from kana.domain.ids import MAX_ID
from kana.errors import ApiError
from kana.models import User
from kana.serializers import user_json

bp = Blueprint("plans_api", __name__, url_prefix="/api/v1")
bp.before_request(auth.require_admin)


def invalid(exc: plans.PlanError, what: str = "plan") -> ApiError:
    parts = "; ".join(f"{field}: {message}" for field, message in exc.errors.items())
    return ApiError(400, "invalid_request", f"Invalid {what}. {parts}",
                    errors={field: [message] for field, message in exc.errors.items()})


def _plan_not_found(plan_id: str) -> ApiError:
    return ApiError(404, "not_found", f"No plan {plan_id!r} in this workspace.")


def _user(session: Any, workspace_id: int, kana_id: int) -> User:
    user = None
    if 0 < kana_id <= MAX_ID:
        user = session.scalar(select(User).where(User.workspace_id == workspace_id, User.kana_id == kana_id))
    if user is None:
        raise ApiError(404, "not_found", f"No user with kana_id {kana_id} in this workspace.")
    return user


@bp.post("/plans")
def create_plan() -> ResponseReturnValue:
    data = json_object()
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        try:
            plan = plans.create_plan(s, ws, data)
        except plans.PlanExists as exc:
            raise ApiError(409, "conflict", str(exc), errors={k: [v] for k, v in exc.errors.items()}) from None
        except plans.PlanError as exc:
            raise invalid(exc) from None
        body = plans.to_dict(s, plan)
    return jsonify(body), 201, {"Location": url_for("plans_api.get_plan", plan_id=body["id"])}


@bp.get("/plans")
def list_plans() -> ResponseReturnValue:
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        body = {"plans": [plans.to_dict(s, p) for p in plans.list_plans(s, ws)]}
    return jsonify(body)


@bp.get("/plans/<plan_id>")
def get_plan(plan_id: str) -> ResponseReturnValue:
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        plan = plans.get_plan(s, ws, plan_id) if features.SLUG.fullmatch(plan_id) else None
        if plan is None:
            raise _plan_not_found(plan_id)
        body = plans.to_dict(s, plan)
    return jsonify(body)


@bp.put("/plans/<plan_id>")
def update_plan(plan_id: str) -> ResponseReturnValue:
    data = json_object()
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        if not features.SLUG.fullmatch(plan_id):
            raise _plan_not_found(plan_id)
        try:
            plan = plans.update_plan(s, ws, plan_id, data)
        except plans.PlanNotFound:
            raise _plan_not_found(plan_id) from None
        except plans.PlanError as exc:
            raise invalid(exc) from None
        body = plans.to_dict(s, plan)
    return jsonify(body)


@bp.put("/users/<int:kana_id>/plan")
def assign_plan(kana_id: int) -> ResponseReturnValue:
    data = json_object()
    plan_id = data.get("plan_id")
    if not isinstance(plan_id, str):
        raise ApiError(400, "invalid_request", "plan_id: is required (a plan id; DELETE takes a user off a plan).",
                       errors={"plan_id": ["is required (a plan id)"]})
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        _user(s, ws, kana_id)
        try:
            user = plans.assign(s, ws, kana_id, plan_id)
        except plans.PlanError as exc:
            raise invalid(exc, "plan assignment") from None
        body = user_json(user, identity.aliases_of(s, ws, kana_id))  # type: ignore[arg-type]
    return jsonify(body)


@bp.delete("/users/<int:kana_id>/plan")
def remove_plan(kana_id: int) -> ResponseReturnValue:
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        _user(s, ws, kana_id)
        plans.assign(s, ws, kana_id, None)
    return "", 204


@bp.get("/users/<int:kana_id>/entitlements")
def user_entitlements(kana_id: int) -> ResponseReturnValue:
    ws = auth.workspace_id()
    with SessionLocal.begin() as s:
        user = _user(s, ws, kana_id)
        body = {"kana_id": user.kana_id, "plan_id": user.plan_id,
                "entitlements": entitlements.user_entitlements(s, ws, user)}
    return jsonify(body)


# --- OpenAPI 3 path items, merged into the document by kana/api/openapi.py ---------------

_ERROR = {"$ref": "#/components/schemas/Error"}
_PLAN_FEATURE = {
    "type": "object",
    "required": ["feature_id"],
    "properties": {
        "feature_id": {"type": "string", "description": "An existing feature's id."},
        "limit": {"type": "number", "nullable": True, "minimum": 0,
                  "description": "Consumable features: usage allowed per period; null = unlimited."},
        "period": {"type": "string", "enum": list(plans.PERIODS), "default": "month",
                   "description": "Calendar UTC month or day, or none (lifetime)."},
        "overage": {"type": "boolean", "default": False, "description": "Usage past the limit is allowed."},
        "thresholds": {"type": "array", "items": {"type": "integer", "minimum": plans.MIN_THRESHOLD,
                                                   "maximum": plans.MAX_THRESHOLD},
                       "description": "Alert thresholds in percent of the limit (usage.threshold_crossed)."},
    },
}
_PLAN_INPUT = {"type": "object", "properties": {
    "id": {"type": "string"}, "name": {"type": "string"}, "features": {"type": "array", "items": _PLAN_FEATURE}}}
_PLAN = {"type": "object", "properties": {
    **_PLAN_INPUT["properties"],
    "features": {"type": "array", "items": {"allOf": [_PLAN_FEATURE, {"type": "object", "properties": {
        "type": {"type": "string", "enum": list(features.TYPES)}}}]}},
    "created_at": {"type": "string", "format": "date-time"},
    "updated_at": {"type": "string", "format": "date-time"}}}
ENTITLEMENT = {"type": "object", "required": ["access", "used", "limit", "remaining", "overage", "period_start",
                                              "period_end"], "properties": {
    "access": {"type": "boolean"},
    "reason": {"type": "string", "enum": ["unknown_user", "no_plan", "not_in_plan", "limit_exceeded"]},
    "used": {"type": "number", "description": "Usage in the current period, exactly the ledger's."},
    "limit": {"type": "number", "nullable": True},
    "remaining": {"type": "number", "nullable": True},
    "overage": {"type": "boolean"},
    "period_start": {"type": "string", "format": "date-time", "nullable": True},
    "period_end": {"type": "string", "format": "date-time", "nullable": True}}}
_PLAN_ID = {"name": "plan_id", "in": "path", "required": True, "schema": {"type": "string"}}
_KANA_ID = {"name": "kana_id", "in": "path", "required": True, "schema": {"type": "integer"}}
_errors = {
    "400": {"description": "Invalid input; `errors` names each field (e.g. features[0].limit).",
            "content": {"application/json": {"schema": _ERROR}}},
    "401": {"description": "Missing, unknown or revoked key."},
    "403": {"description": "Not an admin key."},
}
_404 = {"description": "No such plan or user in this workspace", "content": {"application/json": {"schema": _ERROR}}}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


OPENAPI_PATHS: dict[str, Any] = {
    "/api/v1/plans": {
        "get": {"tags": ["plans"], "operationId": "listPlans", "summary": "List plans",
                "responses": {"200": _json("The plans", {"type": "object", "properties": {
                    "plans": {"type": "array", "items": _PLAN}}}), **_errors}},
        "post": {"tags": ["plans"], "operationId": "createPlan", "summary": "Create a plan",
                 "requestBody": {"required": True, "content": {"application/json": {"schema": {
                     **_PLAN_INPUT, "required": ["id", "name"]}}}},
                 "responses": {"201": _json("The plan", _PLAN), "409": _json("The id is taken", _ERROR), **_errors}},
    },
    "/api/v1/plans/{plan_id}": {
        "parameters": [_PLAN_ID],
        "get": {"tags": ["plans"], "operationId": "getPlan", "summary": "Get a plan",
                "responses": {"200": _json("The plan", _PLAN), "404": _404}},
        "put": {"tags": ["plans"], "operationId": "updatePlan",
                "summary": "Rename a plan and/or replace its features (takes effect on the next check)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _PLAN_INPUT}}},
                "responses": {"200": _json("The plan", _PLAN), "404": _404, **_errors}},
    },
    "/api/v1/users/{kana_id}/plan": {
        "parameters": [_KANA_ID],
        "put": {"tags": ["plans"], "operationId": "assignPlan", "summary": "Put a user on a plan",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["plan_id"], "properties": {"plan_id": {"type": "string"}}}}}},
                "responses": {"200": _json("The user, with plan_id", {"type": "object"}), "404": _404, **_errors}},
        "delete": {"tags": ["plans"], "operationId": "removePlan", "summary": "Take a user off their plan",
                   "responses": {"204": {"description": "Done"}, "404": _404}},
    },
    "/api/v1/users/{kana_id}/entitlements": {
        "parameters": [_KANA_ID],
        "get": {"tags": ["plans"], "operationId": "getUserEntitlements",
                "summary": "Every feature of the user's plan with used/limit/remaining",
                "responses": {"200": _json("The entitlements", {"type": "object", "properties": {
                    "kana_id": {"type": "integer"}, "plan_id": {"type": "string", "nullable": True},
                    "entitlements": {"type": "array", "items": {"allOf": [ENTITLEMENT, {
                        "type": "object", "properties": {"feature_id": {"type": "string"},
                                                         "type": {"type": "string"},
                                                         "period": {"type": "string"}}}]}}}}),
                    "404": _404}},
    },
}
