"""JSON shapes of domain rows: one marshmallow schema each, which both builds the JSON and documents it.

The admin API answers with these, the CLI prints them, and the OpenAPI document
(``kana.api.openapi``) describes responses with the very same schemas, so the
document cannot drift from the bodies. Times are ISO-8601 strings in UTC;
amounts are JSON numbers (int when integral), never strings, so clients can add them up.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

from marshmallow import Schema, fields

from kana.domain import features, keys, ledger, rules
from kana.models import (
    ApiKey,
    Audit,
    DeadLetter,
    Event,
    Feature,
    Plan,
    PlanFeature,
    Rule,
    User,
    WebhookDelivery,
    Workspace,
)


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def amount(value: Decimal | float | int | None) -> int | float:
    """A usage amount as a JSON number: int when integral, else float."""
    if value is None:
        return 0
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    if number == number.to_integral_value():
        return int(number)
    return float(number)


class Time(fields.DateTime):
    """An ISO-8601 time exactly as ``datetime.isoformat`` writes it (or null)."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return iso(value)


class Amount(fields.Float):
    """A usage amount: a JSON number, int when integral."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> int | float:
        return amount(value)


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
    plan_id = _nullable_str(metadata={"description": "the user's plan (PUT /api/v1/users/{kana_id}/plan)"})
    created_at = Time(required=True)
    updated_at = Time(required=True)


class UserDetail(UserOut):
    aliases = fields.List(fields.String(), required=True, metadata={"description": "user_ids merged into this user"})


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
    timestamp = Time()
    received_at = Time()
    processed_at = Time()


class DeadLetterOut(Schema):
    id = fields.Integer(required=True)
    status = fields.Constant("failed", required=True, metadata={"enum": ["failed"], "type": "string"})
    message_id = fields.String(required=True)
    user_id = _nullable_str()
    error = fields.String(required=True)
    attempts = fields.Integer(required=True)
    payload = fields.Dict(required=True)
    created_at = Time(required=True)
    updated_at = Time()


class FeatureOut(Schema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": list(features.TYPES)})
    created_at = Time(required=True)


class RuleOut(rules.RuleSchema):
    """A mapping rule: the fields ``rules.RuleSchema`` accepts, plus its id and times."""

    class Meta:
        # The order the API has always written a rule in: id first.
        fields = ("id", "feature_id", "event", "type", "conditions", "delta_property", "priority", "enabled",
                  "created_at", "updated_at")

    id = fields.Integer(required=True)
    created_at = Time()
    updated_at = Time()


class AuditOut(Schema):
    id = fields.Integer(required=True)
    action = fields.String(required=True, metadata={"enum": ["merge", "delete", "gdpr_delete", "alias"]})
    trigger = fields.String(required=True)
    actor = _nullable_str()
    survivor_kana_id = fields.Integer(allow_none=True)
    kana_ids = fields.List(fields.Integer())
    detail = fields.Dict()
    at = Time(required=True)


class KeyOut(Schema):
    # Only the prefix: the key itself is shown once, when created.
    id = fields.Integer(required=True)
    prefix = fields.String(required=True)
    scope = fields.String(required=True, metadata={"enum": list(keys.SCOPES)})
    name = _nullable_str()
    created_at = Time(required=True)
    revoked_at = Time(allow_none=True)


class WorkspaceOut(Schema):
    # Secrets are write-only: say whether they are set, never what they are.
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    billing_provider = _nullable_str(required=True, metadata={"enum": ["stripe", "chargebee", None]})
    stripe_api_key_set = fields.Function(lambda w: bool(w.stripe_api_key), required=True,
                                         metadata={"type": "boolean"})
    chargebee_site = _nullable_str(required=True)
    chargebee_api_key_set = fields.Function(lambda w: bool(w.chargebee_api_key), required=True,
                                            metadata={"type": "boolean"})
    segment_shared_secret_set = fields.Function(lambda w: bool(w.segment_shared_secret), required=True,
                                                metadata={"type": "boolean"})
    keep_ip = fields.Boolean(required=True)


class SeriesPoint(Schema):
    start = fields.DateTime(required=True)
    total = fields.Float(required=True)


class UsageOut(Schema):
    feature = fields.String(required=True)
    kana_id = fields.Integer()
    total = fields.Float(required=True)
    window = fields.String(metadata={"enum": list(ledger.WINDOWS)})
    series = fields.List(fields.Nested(SeriesPoint), metadata={"description": "only when window is given"})


PERIODS = ("month", "day", "none")  # of a plan feature: calendar UTC month, day, or none (lifetime)
REASONS = ("unknown_user", "no_plan", "not_in_plan", "limit_exceeded")
DELIVERY_STATUSES = ("pending", "delivered", "failed")


def _moment(**kwargs: Any) -> fields.String:
    # Built as ISO-8601 text by the domain (``entitlements.answer``).
    return fields.String(metadata={"format": "date-time"}, **kwargs)


class PlanFeatureOut(Schema):
    feature_id = fields.String(required=True)
    # The feature's, not the row's: ``plan_json`` fills it in.
    type = fields.String(required=True, allow_none=True, metadata={"enum": [*features.TYPES, None]})
    limit = fields.Function(lambda pf: None if pf.limit is None else amount(pf.limit), required=True,
                            allow_none=True, metadata={"type": "number", "description": "per period; null = unlimited"})
    period = fields.String(required=True, metadata={"enum": list(PERIODS)})
    overage = fields.Boolean(required=True)
    thresholds = fields.Function(lambda pf: list(pf.thresholds or []), required=True, metadata={
        "type": "array", "items": {"type": "integer"}, "description": "percent of the limit"})


class PlanOut(Schema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    features = fields.List(fields.Nested(PlanFeatureOut), required=True)
    created_at = Time(required=True)
    updated_at = Time(required=True)


class PlanList(Schema):
    plans = fields.List(fields.Nested(PlanOut), required=True)


class EntitlementOut(Schema):
    """The check's answer (SPEC §10): may the user use the feature now, and where they stand."""

    access = fields.Boolean(required=True)
    reason = fields.String(metadata={"enum": list(REASONS), "description": "only when access is false"})
    used = fields.Float(required=True, metadata={"description": "usage in the current period, the ledger's"})
    limit = fields.Float(required=True, allow_none=True)
    remaining = fields.Float(required=True, allow_none=True)
    overage = fields.Boolean(required=True)
    period_start = _moment(required=True, allow_none=True)
    period_end = _moment(required=True, allow_none=True)


class UserEntitlementOut(EntitlementOut):
    feature_id = fields.String(required=True)
    type = fields.String(required=True, metadata={"enum": list(features.TYPES)})
    period = fields.String(required=True, metadata={"enum": list(PERIODS)})


class EntitlementList(Schema):
    kana_id = fields.Integer(required=True)
    plan_id = _nullable_str(required=True)
    entitlements = fields.List(fields.Nested(UserEntitlementOut), required=True)


class WebhookOut(Schema):
    url = fields.String(required=True)
    secret = fields.String(required=True, metadata={"description": "shown once; every PUT rotates it"})


class DeliveryOut(Schema):
    id = fields.Integer(required=True)
    type = fields.String(required=True, metadata={"enum": ["usage.threshold_crossed"]})
    idempotency_key = fields.String(required=True, metadata={
        "description": "sent as Kana-Idempotency-Key; stable per (user, feature, threshold, period)"})
    status = fields.String(required=True, metadata={"enum": list(DELIVERY_STATUSES)})
    attempts = fields.Integer(required=True)
    last_error = _nullable_str()
    last_status = fields.Integer(allow_none=True)
    # When the next attempt is due: only while the delivery is pending.
    next_attempt_at = fields.Function(lambda row: iso(row.next_attempt_at) if row.status == "pending" else None,
                                      allow_none=True, metadata={"type": "string", "format": "date-time"})
    created_at = Time(required=True)
    delivered_at = Time(allow_none=True)
    payload = fields.Dict(required=True, metadata={
        "description": "the body POSTed: {type, id, created_at, data: {kana_id, user_id, feature_id, threshold, "
                       "used, limit, period_start, period_end}}"})


class DeliveryRetried(DeliveryOut):
    queue_error = fields.String(metadata={"description": "Redis was down: the delivery is sent once it is back"})


class DeliveryPage(Schema):
    deliveries = fields.List(fields.Nested(DeliveryOut), required=True)
    next_cursor = _nullable_str(required=True)


_USER = UserOut()
_PLAN = PlanOut(exclude=("features",))
_PLAN_FEATURE = PlanFeatureOut(exclude=("type",))


def plan_json(plan: Plan, rows: list[PlanFeature], kinds: dict[str, str]) -> dict[str, Any]:
    """A plan with its features (``rows``), each with its feature's type (``kinds``: feature id -> type)."""
    items = [{**_PLAN_FEATURE.dump(pf), "type": kinds.get(pf.feature_id)} for pf in rows]
    return {**_PLAN.dump(plan), "features": items}


def user_json(user: User, aliases: list[str] | None = None) -> dict[str, Any]:
    if aliases is None:
        return _USER.dump(user)
    return {**_USER.dump(user), "aliases": list(aliases)}


# Row → JSON: each schema's dump (schemas hold no per-call state, so one instance serves all).
event_json: Callable[[Event], dict[str, Any]] = EventOut().dump
dead_letter_json: Callable[[DeadLetter], dict[str, Any]] = DeadLetterOut().dump
feature_json: Callable[[Feature], dict[str, Any]] = FeatureOut().dump
rule_json: Callable[[Rule], dict[str, Any]] = RuleOut().dump
audit_json: Callable[[Audit], dict[str, Any]] = AuditOut().dump
key_json: Callable[[ApiKey], dict[str, Any]] = KeyOut().dump
workspace_json: Callable[[Workspace], dict[str, Any]] = WorkspaceOut().dump
delivery_json: Callable[[WebhookDelivery], dict[str, Any]] = DeliveryOut().dump
