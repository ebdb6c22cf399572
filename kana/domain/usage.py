"""Turning a stored event into usage: featureId mapping and the ledger row (SPEC §7)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from sqlalchemy import select
from sqlalchemy.orm import Session

from kana.domain.rules import NO_RULE_MATCHED, CompiledRule, match
from kana.models import Feature

MAPPABLE = ("track", "page", "screen")


@dataclass(frozen=True)
class Mapping:
    """Where an event's usage goes, or why it goes nowhere."""

    feature_id: str | None = None
    delta: Decimal | None = None
    reason: str | None = None


def to_delta(value: object) -> Decimal:
    """A usage amount from a property value (finite numbers only, bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ValueError(f"delta must be a finite number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"delta must be a finite number, got {value!r}")
    try:
        return Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"delta must be a finite number, got {value!r}") from exc


def map_event(
    event_type: str,
    properties: dict,
    features: dict[str, Feature],
    rules: Sequence[CompiledRule] = (),
    name: str | None = None,
) -> Mapping:
    """Map by ``properties.featureId``, else by the first matching mapping rule (SPEC §7)."""
    feature_id = properties.get("featureId")
    if feature_id is not None:
        if feature_id not in features:
            return Mapping(reason=f"unknown featureId {feature_id!r}")
        return Mapping(feature_id=feature_id, delta=to_delta(properties.get("delta", 1)))
    found = match(rules, event_type, name, properties) if rules else None
    if found is None:
        return Mapping(reason=NO_RULE_MATCHED)
    if found.feature_id is None:
        return Mapping(reason=found.reason)
    return Mapping(feature_id=found.feature_id, delta=found.delta)


def load_features(session: Session, workspace_id: int) -> dict[str, Feature]:
    return {f.id: f for f in session.scalars(select(Feature).where(Feature.workspace_id == workspace_id))}


def status_of(mapping: Mapping) -> dict:
    """The event columns saying where its usage went (status, reason, feature_id)."""
    if mapping.feature_id is None:
        return {"status": "unmapped", "reason": mapping.reason, "feature_id": None}
    return {"status": "mapped", "reason": None, "feature_id": mapping.feature_id}
