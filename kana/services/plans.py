"""Plans and the plan a user is on (SPEC §11); entitlements read and checked.

Each change commits in its own unit of work; the domain marks the workspace's
entitlement cache stale (``counters.touch``) and the commit moves its
generation on, so the next check reads the new plan.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from kana.db import SessionLocal
from kana.domain import entitlements, features, identity, plans
from kana.runtime import Runtime
from kana.serializers import user_json


def get(workspace_id: int, plan_id: str) -> dict[str, Any]:
    with SessionLocal.begin() as s:
        plan = plans.get_plan(s, workspace_id, plan_id) if features.SLUG.fullmatch(plan_id) else None
        if plan is None:
            raise plans.PlanNotFound(plan_id)
        return plans.as_json(s, plan)


def listed(workspace_id: int) -> list[dict[str, Any]]:
    with SessionLocal.begin() as s:
        return [plans.as_json(s, p) for p in plans.list_plans(s, workspace_id)]


def create(workspace_id: int, data: Any) -> dict[str, Any]:
    """A new plan from its JSON shape (``plans.PlanSchema``)."""
    with SessionLocal.begin() as s:
        return plans.as_json(s, plans.create_plan(s, workspace_id, data))


def update(workspace_id: int, plan_id: str, data: Any) -> dict[str, Any]:
    """A new name and/or feature list (``plans.PlanUpdateSchema``); takes effect on the next check."""
    with SessionLocal.begin() as s:
        return plans.as_json(s, plans.update_plan(s, workspace_id, plan_id, data))


def assign(workspace_id: int, kana_id: int, plan_id: str | None) -> dict[str, Any]:
    """Put a user on a plan (None: off any plan); the user as JSON."""
    with SessionLocal.begin() as s:
        user = plans.assign(s, workspace_id, kana_id, plan_id)
        return user_json(user, identity.aliases_of(s, workspace_id, kana_id))


def user_entitlements(workspace_id: int, kana_id: int) -> dict[str, Any]:
    """Every feature of the user's plan with used/limit/remaining."""
    with SessionLocal.begin() as s:
        user = plans.user_of(s, workspace_id, kana_id)
        return {"kana_id": user.kana_id, "plan_id": user.plan_id,
                "entitlements": entitlements.user_entitlements(s, workspace_id, user)}


def check(rt: Runtime, workspace_id: int, user_id: str, feature_id: str, delta: Decimal) -> dict[str, Any]:
    """May this user use this feature now (canUseFeature): from Redis, PostgreSQL on a miss."""
    return entitlements.check(rt.redis, SessionLocal, workspace_id, user_id, feature_id, delta)
