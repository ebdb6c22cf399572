"""Plans (SPEC §10, §11): create, list, read, change; the plan a user is on and the user's entitlements."""

from __future__ import annotations

from flask import jsonify, url_for
from flask.typing import ResponseReturnValue
from marshmallow import fields

from kana import auth
from kana.api.common import StrictSchema, body, bp, doc, json_object
from kana.domain.plans import PlanSchema, PlanUpdateSchema
from kana.serializers import EntitlementList, PlanList, PlanOut, UserDetail
from kana.services import plans as plan_actions


class PlanAssignment(StrictSchema):
    plan_id = fields.String(required=True, metadata={"description": "a plan id (DELETE takes a user off a plan)"})


@bp.post("/plans")
@doc("createPlan", "Create a plan", body=PlanSchema, status=201, response=PlanOut, errors=(400, 401, 403, 409))
def create_plan() -> ResponseReturnValue:
    result = plan_actions.create(auth.workspace_id(), json_object())
    return jsonify(result), 201, {"Location": url_for("api.get_plan", plan_id=result["id"])}


@bp.get("/plans")
@doc("listPlans", "List plans", response=PlanList, errors=(401, 403))
def list_plans() -> ResponseReturnValue:
    return jsonify({"plans": plan_actions.listed(auth.workspace_id())})


@bp.get("/plans/<plan_id>")
@doc("getPlan", "A plan", response=PlanOut, errors=(401, 403, 404))
def get_plan(plan_id: str) -> ResponseReturnValue:
    return jsonify(plan_actions.get(auth.workspace_id(), plan_id))


@bp.put("/plans/<plan_id>")
@doc("updatePlan", "Rename a plan and/or replace its features (takes effect on the next check)",
     body=PlanUpdateSchema, response=PlanOut, errors=(400, 401, 403, 404))
def update_plan(plan_id: str) -> ResponseReturnValue:
    return jsonify(plan_actions.update(auth.workspace_id(), plan_id, json_object()))


@bp.put("/users/<id:kana_id>/plan")
@doc("assignPlan", "Put a user on a plan", body=PlanAssignment, response=UserDetail, errors=(400, 401, 403, 404))
def assign_plan(kana_id: int) -> ResponseReturnValue:
    data = body(PlanAssignment)
    return jsonify(plan_actions.assign(auth.workspace_id(), kana_id, data["plan_id"]))


@bp.delete("/users/<id:kana_id>/plan")
@doc("removePlan", "Take a user off their plan", status=204, errors=(401, 403, 404))
def remove_plan(kana_id: int) -> ResponseReturnValue:
    plan_actions.assign(auth.workspace_id(), kana_id, None)
    return "", 204


@bp.get("/users/<id:kana_id>/entitlements")
@doc("getUserEntitlements", "Every feature of the user's plan with used/limit/remaining",
     response=EntitlementList, errors=(401, 403, 404))
def user_entitlements(kana_id: int) -> ResponseReturnValue:
    return jsonify(plan_actions.user_entitlements(auth.workspace_id(), kana_id))
