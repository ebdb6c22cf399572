"""JSON shapes of domain rows, shared by the admin API (and anything else answering JSON).

Times are ISO-8601 strings in UTC; amounts are JSON numbers (int when integral),
never strings, so clients can add them up.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from kana.models import ApiKey, Audit, DeadLetter, Event, Feature, User, Workspace


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


def user_json(user: User, aliases: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kana_id": user.kana_id,
        "user_id": user.user_id,
        "email": user.email,
        "name": user.name,
        "billing_id": user.billing_id,
        "billing_provider": user.billing_provider,
        "source": user.source,
        "group_id": user.group_id,
        "group_name": user.group_name,
        "plan_id": user.plan_id,
        "created_at": iso(user.created_at),
        "updated_at": iso(user.updated_at),
    }
    if aliases is not None:
        body["aliases"] = list(aliases)
    return body


def event_json(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "message_id": event.message_id,
        "type": event.type,
        "name": event.name,
        "user_id": event.user_id,
        "kana_id": event.kana_id,
        "status": event.status,
        "reason": event.reason,
        "feature_id": event.feature_id,
        "properties": event.properties,
        "timestamp": iso(event.timestamp),
        "received_at": iso(event.received_at),
        "processed_at": iso(event.processed_at),
    }


def dead_letter_json(row: DeadLetter) -> dict[str, Any]:
    return {
        "id": row.id,
        "status": "failed",
        "message_id": row.message_id,
        "user_id": row.user_id,
        "error": row.error,
        "attempts": row.attempts,
        "payload": row.payload,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def feature_json(feature: Feature) -> dict[str, Any]:
    return {
        "id": feature.id,
        "name": feature.name,
        "type": feature.type,
        "created_at": iso(feature.created_at),
    }


def audit_json(row: Audit) -> dict[str, Any]:
    return {
        "id": row.id,
        "action": row.action,
        "trigger": row.trigger,
        "actor": row.actor,
        "survivor_kana_id": row.survivor_kana_id,
        "kana_ids": row.kana_ids,
        "detail": row.detail,
        "at": iso(row.at),
    }


def key_json(row: ApiKey) -> dict[str, Any]:
    # Only the prefix: the key itself is shown once, when created.
    return {
        "id": row.id,
        "prefix": row.prefix,
        "scope": row.scope,
        "name": row.name,
        "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at),
    }


def workspace_json(row: Workspace) -> dict[str, Any]:
    # Secrets are write-only: say whether they are set, never what they are.
    return {
        "id": row.id,
        "name": row.name,
        "billing_provider": row.billing_provider,
        "stripe_api_key_set": bool(row.stripe_api_key),
        "chargebee_site": row.chargebee_site,
        "chargebee_api_key_set": bool(row.chargebee_api_key),
    }
