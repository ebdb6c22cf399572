"""Plans (SPEC §11): bundles of feature entitlements, and which plan a user is on.

Every change here marks the workspace's entitlement cache stale
(``counters.touch``): the next check after the commit reads the new plan.
"""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from kana.domain import counters, features, ids
from kana.errors import Conflict, KanaError, NotFound
from kana.models import Feature, Plan, PlanFeature, User, utcnow
from kana.serializers import PERIODS, plan_json

MIN_THRESHOLD, MAX_THRESHOLD = 1, 1000
# What the ledger's amount column holds (NUMERIC(28, 9)).
MAX_LIMIT = 10**18


class PlanError(KanaError, ValueError):
    """Invalid plan data; ``errors`` maps each offending field (``features[0].limit``) to what is wrong."""

    def __init__(self, errors: dict[str, str | list[str]]) -> None:
        listed = {k: [v] if isinstance(v, str) else list(v) for k, v in errors.items()}
        super().__init__("Invalid plan. " + "; ".join(f"{'body' if k == '_schema' else k}: {' '.join(v)}"
                                                      for k, v in listed.items()), listed)


class PlanExists(PlanError, Conflict):
    """A plan with this id already exists in the workspace (409, from ``Conflict``)."""


class PlanNotFound(NotFound, LookupError):
    """No plan with this id in the workspace."""

    def __init__(self, plan_id: object) -> None:
        super().__init__(f"No plan {plan_id!r} in this workspace.")
        self.plan_id = plan_id


class UserNotFound(NotFound, LookupError):
    def __init__(self, kana_id: int) -> None:
        super().__init__(f"No user with kana_id {kana_id} in this workspace.")


# --- input: the shape a plan is accepted in (API, dashboard, CLI) ----------------------


def _slug(value: str) -> None:
    if not features.SLUG.fullmatch(value):
        raise ValidationError("must be a slug: 1-100 lower-case letters, digits, '_' or '-', "
                              "starting with a letter or digit")


class PlanFeatureSchema(Schema):
    class Meta:
        unknown = RAISE

    feature_id = fields.String(required=True, validate=validate.Length(1, 100),
                               metadata={"description": "An existing feature's id."})
    limit = fields.Decimal(allow_none=True, load_default=None, allow_nan=False,
                           validate=validate.Range(0, MAX_LIMIT, error="must be a number from {min} to {max} "
                                                   "(or null: unlimited)"),
                           # Numbers in the document (a Decimal field would state its bounds as strings).
                           metadata={"description": "Consumable features: usage allowed per period; "
                                                    "null = unlimited.", "minimum": 0, "maximum": MAX_LIMIT})
    period = fields.String(load_default="month", validate=validate.OneOf(PERIODS),
                           metadata={"description": "Calendar UTC month or day, or none (lifetime)."})
    overage = fields.Boolean(load_default=False, metadata={"description": "Usage past the limit is allowed."})
    thresholds = fields.List(
        fields.Integer(strict=True, validate=validate.Range(MIN_THRESHOLD, MAX_THRESHOLD)), load_default=list,
        validate=validate.Length(max=MAX_THRESHOLD),
        metadata={"description": "Alert thresholds in percent of the limit (usage.threshold_crossed)."})
    # A plan read back (which names each feature's type) may be sent as is: the type is the feature's.
    type = fields.String(load_only=True, validate=validate.OneOf(features.TYPES),
                         metadata={"description": "Ignored: the feature's own type."})


class PlanUpdateSchema(Schema):
    """``PUT /api/v1/plans/{plan_id}``: a new name and/or the plan's whole feature list."""

    class Meta:
        unknown = RAISE

    name = fields.String(validate=validate.Length(1, features.MAX_NAME))
    features = fields.List(fields.Nested(PlanFeatureSchema), validate=validate.Length(max=1000))


class PlanSchema(PlanUpdateSchema):
    """A new plan (``name`` defaults to the id)."""

    id = fields.String(required=True, validate=_slug, metadata={"pattern": f"^{features.SLUG.pattern}$"})


def _field_name(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _flatten(messages: Any, path: list[str | int] | None = None) -> dict[str, list[str]]:
    """Marshmallow's nested errors keyed as ``features[0].limit``."""
    path = path or []
    if isinstance(messages, dict):
        out: dict[str, list[str]] = {}
        for key, value in messages.items():
            if isinstance(key, int) and isinstance(value, list):
                # An item of a list of values (thresholds): the list is the field.
                out.setdefault(_field_name(path), []).extend(f"item {key}: {m}" for m in value)
            else:
                out.update(_flatten(value, [*path, key]))
        return out
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return {_field_name(path) or "_schema": list(messages)}
    return {_field_name(path) or "_schema": [str(messages)]}


def validate_plan(data: object, *, new: bool) -> dict[str, Any]:
    """A plan's fields checked for shape (``PlanError`` names each offending field)."""
    if not isinstance(data, dict):
        raise PlanError({"_schema": "the plan must be a JSON object"})
    try:
        return (PlanSchema() if new else PlanUpdateSchema()).load(data)
    except ValidationError as exc:
        raise PlanError(_flatten(exc.messages)) from None


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


def as_json(session: Session, plan: Plan) -> dict[str, Any]:
    """The plan as the API answers it (``serializers.PlanOut``)."""
    kinds = {f.id: f.type for f in features.list_features(session, plan.workspace_id)}
    return plan_json(plan, plan_features(session, plan.workspace_id, plan.id), kinds)


def _feature_rows(session: Session, workspace_id: int, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plan features (already shape-checked) checked against the workspace's features."""
    known: dict[str, Feature] = {f.id: f for f in features.list_features(session, workspace_id)}
    errors: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        at = f"features[{i}]"
        feature_id = item["feature_id"]
        feature = known.get(feature_id)
        if feature is None:
            errors[f"{at}.feature_id"] = f"no feature {feature_id!r} in this workspace"
            continue
        if feature_id in seen:
            errors[f"{at}.feature_id"] = f"feature {feature_id!r} is listed twice"
            continue
        seen.add(feature_id)
        limit, thresholds = item["limit"], item["thresholds"]
        if feature.type == "binary" and (limit is not None or thresholds):
            errors[f"{at}.limit"] = f"feature {feature_id!r} is binary: it has no limit or thresholds"
        rows.append({"feature_id": feature_id, "limit": limit, "period": item["period"],
                     "overage": item["overage"], "thresholds": sorted(set(thresholds))})
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


def create_plan(session: Session, workspace_id: int, data: object) -> Plan:
    """A new plan from its JSON shape (``PlanSchema``); PlanError names each bad field."""
    checked = validate_plan(data, new=True)
    plan_id = checked["id"]
    name = _check_name(checked.get("name", plan_id))
    rows = _feature_rows(session, workspace_id, checked.get("features", []))
    if get_plan(session, workspace_id, plan_id) is not None:
        raise PlanExists({"id": f"plan {plan_id!r} already exists"})
    plan = Plan(workspace_id=workspace_id, id=plan_id, name=name)
    session.add(plan)
    _replace_features(session, workspace_id, plan_id, rows)
    session.flush()
    counters.touch(session, workspace_id)
    return plan


def update_plan(session: Session, workspace_id: int, plan_id: str, data: object) -> Plan:
    """Rename a plan and/or replace its features (limits take effect on the next check)."""
    plan = get_plan(session, workspace_id, plan_id) if features.SLUG.fullmatch(plan_id) else None
    if plan is None:
        raise PlanNotFound(plan_id)
    checked = validate_plan(data, new=False)
    if "name" in checked:
        plan.name = _check_name(checked["name"])
    if "features" in checked:
        _replace_features(session, workspace_id, plan_id, _feature_rows(session, workspace_id, checked["features"]))
    plan.updated_at = utcnow()
    session.flush()
    counters.touch(session, workspace_id)
    return plan


def user_of(session: Session, workspace_id: int, kana_id: int) -> User:
    """The workspace's user with this kana_id (UserNotFound: none, or not an id at all)."""
    user = None
    if ids.in_id_range(kana_id):
        user = session.scalar(select(User).where(User.workspace_id == workspace_id, User.kana_id == kana_id))
    if user is None:
        raise UserNotFound(kana_id)
    return user


def assign(session: Session, workspace_id: int, kana_id: int, plan_id: str | None) -> User:
    """Put a user on a plan (None: off any plan)."""
    user = user_of(session, workspace_id, kana_id)
    put_on(session, user, plan_id)
    session.flush()
    return user


def check_plan_id(session: Session, workspace_id: int, plan_id: object) -> str:
    """``plan_id`` if the workspace has that plan; PlanError naming ``plan_id`` otherwise."""
    if not isinstance(plan_id, str) or not features.SLUG.fullmatch(plan_id) \
            or get_plan(session, workspace_id, plan_id) is None:
        raise PlanError({"plan_id": f"no plan {plan_id!r} in this workspace"})
    return plan_id


def put_on(session: Session, user: User, plan_id: str | None) -> bool:
    """Set a user's plan (an existing one, or None); whether it changed. Marks the entitlement cache stale."""
    if plan_id is not None:
        check_plan_id(session, user.workspace_id, plan_id)
    if user.plan_id == plan_id:
        return False
    user.plan_id = plan_id
    counters.touch(session, user.workspace_id)
    return True
