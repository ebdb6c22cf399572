"""Plans (SPEC §11): bundles of feature entitlements, and which plan a user is on.

Every change here marks the workspace's entitlement cache stale
(``counters.touch``): the next check after the commit reads the new plan.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kana.domain import counters, entitlements, features
from kana.domain.usage import to_delta
from kana.models import Feature, Plan, PlanFeature, User, utcnow

PERIODS = ("month", "day", "none")
MIN_THRESHOLD, MAX_THRESHOLD = 1, 1000


class PlanError(ValueError):
    """Invalid plan data; ``errors`` maps each offending field to what is wrong."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


class PlanNotFound(LookupError):
    """No plan with this id in the workspace."""


class PlanExists(PlanError):
    """A plan with this id already exists in the workspace."""


def get_plan(session: Session, workspace_id: int, plan_id: str) -> Plan | None:
    return session.get(Plan, (workspace_id, plan_id))


def plan_features(session: Session, workspace_id: int, plan_id: str) -> list[PlanFeature]:
    return list(session.scalars(
        select(PlanFeature)
        .where(PlanFeature.workspace_id == workspace_id, PlanFeature.plan_id == plan_id)
        .order_by(PlanFeature.feature_id)
    ))


def list_plans(session: Session, workspace_id: int) -> list[Plan]:
    return list(session.scalars(select(Plan).where(Plan.workspace_id == workspace_id).order_by(Plan.id)))


def to_dict(session: Session, plan: Plan) -> dict[str, Any]:
    kinds = {f.id: f.type for f in features.list_features(session, plan.workspace_id)}
    return {
        "id": plan.id,
        "name": plan.name,
        "features": [
            {
                "feature_id": pf.feature_id,
                "type": kinds.get(pf.feature_id),
                "limit": entitlements.number(pf.limit),
                "period": pf.period,
                "overage": pf.overage,
                "thresholds": list(pf.thresholds or []),
            }
            for pf in plan_features(session, plan.workspace_id, plan.id)
        ],
        "created_at": plan.created_at.isoformat(),
        "updated_at": plan.updated_at.isoformat(),
    }


def _feature_rows(session: Session, workspace_id: int, raw: object) -> list[dict[str, Any]]:
    """Validated plan features; PlanError names every bad field (``features[i].limit``)."""
    if not isinstance(raw, list):
        raise PlanError({"features": "must be a list of {feature_id, limit?, period?, overage?, thresholds?}"})
    known: dict[str, Feature] = {f.id: f for f in features.list_features(session, workspace_id)}
    errors: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        at = f"features[{i}]"
        if not isinstance(item, dict):
            errors[at] = "must be an object"
            continue
        unknown = set(item) - {"feature_id", "limit", "period", "overage", "thresholds", "type"}
        for key in sorted(unknown):
            errors[f"{at}.{key}"] = "unknown field"
        feature_id = item.get("feature_id")
        feature = known.get(feature_id) if isinstance(feature_id, str) else None
        if feature is None:
            errors[f"{at}.feature_id"] = (f"no feature {feature_id!r} in this workspace" if isinstance(feature_id, str)
                                          else "is required (a feature id)")
            continue
        if feature_id in seen:
            errors[f"{at}.feature_id"] = f"feature {feature_id!r} is listed twice"
            continue
        seen.add(feature_id)
        limit = item.get("limit")
        if limit is not None:
            try:
                limit = to_delta(limit)
            except ValueError:
                errors[f"{at}.limit"] = "must be a number or null (unlimited)"
                limit = None
            else:
                if limit < 0:
                    errors[f"{at}.limit"] = "must not be negative"
        period = item.get("period", "month")
        if period not in PERIODS:
            errors[f"{at}.period"] = f"must be one of {', '.join(PERIODS)}"
        overage = item.get("overage", False)
        if not isinstance(overage, bool):
            errors[f"{at}.overage"] = "must be true or false"
        thresholds = item.get("thresholds", [])
        if not isinstance(thresholds, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and MIN_THRESHOLD <= t <= MAX_THRESHOLD for t in thresholds
        ):
            errors[f"{at}.thresholds"] = (f"must be a list of whole percentages from {MIN_THRESHOLD} "
                                          f"to {MAX_THRESHOLD}")
            thresholds = []
        if feature.type == "binary" and (limit is not None or thresholds):
            errors[f"{at}.limit"] = f"feature {feature_id!r} is binary: it has no limit or thresholds"
        rows.append({"feature_id": feature_id, "limit": limit, "period": period, "overage": overage,
                     "thresholds": sorted(set(thresholds))})
    if errors:
        raise PlanError(errors)
    return rows


def _check_name(name: object) -> str:
    try:
        return features.check_name(name)
    except features.FeatureError as exc:
        raise PlanError({"name": exc.message}) from None


def _replace_features(session: Session, workspace_id: int, plan_id: str, rows: list[dict[str, Any]]) -> None:
    session.execute(delete(PlanFeature).where(PlanFeature.workspace_id == workspace_id,
                                              PlanFeature.plan_id == plan_id))
    session.add_all(PlanFeature(workspace_id=workspace_id, plan_id=plan_id, **row) for row in rows)


def create_plan(session: Session, workspace_id: int, data: dict[str, Any]) -> Plan:
    try:
        plan_id = features.check_id(data.get("id"))
    except features.FeatureError as exc:
        raise PlanError({"id": exc.message}) from None
    name = _check_name(data.get("name", plan_id))
    rows = _feature_rows(session, workspace_id, data.get("features", []))
    if get_plan(session, workspace_id, plan_id) is not None:
        raise PlanExists({"id": f"plan {plan_id!r} already exists"})
    plan = Plan(workspace_id=workspace_id, id=plan_id, name=name)
    session.add(plan)
    _replace_features(session, workspace_id, plan_id, rows)
    session.flush()
    counters.touch(session, workspace_id)
    return plan


def update_plan(session: Session, workspace_id: int, plan_id: str, data: dict[str, Any]) -> Plan:
    """Rename a plan and/or replace its features (limits take effect on the next check)."""
    plan = get_plan(session, workspace_id, plan_id)
    if plan is None:
        raise PlanNotFound(plan_id)
    if "name" in data:
        plan.name = _check_name(data["name"])
    if "features" in data:
        _replace_features(session, workspace_id, plan_id, _feature_rows(session, workspace_id, data["features"]))
    plan.updated_at = utcnow()
    session.flush()
    counters.touch(session, workspace_id)
    return plan


def assign(session: Session, workspace_id: int, kana_id: int, plan_id: str | None) -> User | None:
    """Put a user on a plan (None: off any plan); None when there is no such user."""
    if plan_id is not None and (not isinstance(plan_id, str) or get_plan(session, workspace_id, plan_id) is None):
        raise PlanError({"plan_id": f"no plan {plan_id!r} in this workspace"})
    user = session.scalar(select(User).where(User.workspace_id == workspace_id, User.kana_id == kana_id))
    if user is None:
        return None
    user.plan_id = plan_id
    session.flush()
    counters.touch(session, workspace_id)
    return user
