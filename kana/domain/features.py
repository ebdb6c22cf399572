"""Features usage is recorded against (SPEC §7): id (a slug), name and type."""

from __future__ import annotations

import re

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from kana.domain import counters, rules, totals
from kana.errors import Conflict, KanaError, NotFound
from kana.models import Event, Feature, PlanFeature, Usage

# What ``properties.featureId`` names: lower-case, URL- and CSV-safe.
SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")
TYPES = ("consumable", "binary")


class FeatureError(KanaError, ValueError):
    """Invalid feature data; ``field`` names the offending field, ``message`` what is wrong with it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"Invalid feature {field}: {message}.", {field: [message]})
        self.field = field
        self.message = message


class DuplicateFeature(FeatureError):
    """A feature with this id already exists in the workspace."""

    status = 409
    code = "conflict"


class FeatureNotFound(NotFound, LookupError):
    """No feature with this id in the workspace."""

    def __init__(self, feature_id: str) -> None:
        super().__init__(f"No feature {feature_id!r} in this workspace.")


class FeatureInUse(Conflict, ValueError):
    """The feature has recorded usage or is in a plan; deleting it needs ``force``."""


MAX_NAME = 200


def check_id(feature_id: object) -> str:
    if not isinstance(feature_id, str) or not SLUG.fullmatch(feature_id):
        raise FeatureError(
            "id", "must be a slug: 1-100 lower-case letters, digits, '_' or '-', starting with a letter or digit"
        )
    return feature_id


def check_type(kind: object) -> str:
    if kind not in TYPES:
        raise FeatureError("type", f"must be one of {', '.join(TYPES)}")
    return kind  # type: ignore[return-value]


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise FeatureError("name", "must be a non-empty string")
    if "\x00" in name:
        raise FeatureError("name", "must not contain NUL characters")
    if len(name.strip()) > MAX_NAME:
        raise FeatureError("name", f"must be at most {MAX_NAME} characters")
    return name.strip()


def get_feature(session: Session, workspace_id: int, feature_id: str) -> Feature | None:
    return session.get(Feature, (workspace_id, feature_id))


def list_features(session: Session, workspace_id: int) -> list[Feature]:
    return list(session.scalars(select(Feature).where(Feature.workspace_id == workspace_id).order_by(Feature.id)))


def create_feature(
    session: Session, workspace_id: int, id: str, name: str | None = None, type: str = "consumable"
) -> Feature:
    """Create a feature; ``DuplicateFeature`` when the id is taken in this workspace."""
    feature_id = check_id(id)
    kind = check_type(type)
    label = check_name(name if name is not None else feature_id)
    # In-flight chunks that stored this id's events as "unknown featureId" commit
    # first, so the reprocessing that follows the create sees them.
    rules.hold_mapping(session, workspace_id, exclusive=True)
    if get_feature(session, workspace_id, feature_id) is not None:
        raise DuplicateFeature("id", f"feature {feature_id!r} already exists")
    feature = Feature(workspace_id=workspace_id, id=feature_id, name=label, type=kind)
    try:
        # A savepoint, so a concurrent create of the same id fails this call
        # alone (as a duplicate) instead of poisoning the caller's transaction.
        with session.begin_nested():
            session.add(feature)
    except IntegrityError as exc:
        raise DuplicateFeature("id", f"feature {feature_id!r} already exists") from exc
    return feature


def update_feature(
    session: Session, workspace_id: int, feature_id: str, *, name: str | None = None, type: str | None = None
) -> Feature:
    """Rename or retype a feature (its id is what events name, so it never changes)."""
    feature = get_feature(session, workspace_id, feature_id)
    if feature is None:
        raise FeatureNotFound(feature_id)
    if name is not None:
        feature.name = check_name(name)
    if type is not None:
        feature.type = check_type(type)
        counters.touch(session, workspace_id)  # checks answer by the feature's type
    session.flush()
    return feature


def usage_count(session: Session, workspace_id: int, feature_id: str) -> int:
    stmt = select(func.count()).select_from(Usage).where(
        Usage.workspace_id == workspace_id, Usage.feature_id == feature_id
    )
    return session.scalar(stmt) or 0


def delete_feature(session: Session, workspace_id: int, feature_id: str, *, force: bool = False) -> None:
    """Delete a feature.

    The usage ledger is what billing runs on, so a feature with recorded usage
    is only deleted with ``force``: its usage rows go, and their events become
    unmapped again (a feature re-created later can pick them up). A feature in
    a plan likewise needs ``force``, which takes it out of the plans.
    """
    # In-flight chunks that record usage of this feature commit first; usage rows
    # have no foreign key to features, so none may land after the delete.
    rules.hold_mapping(session, workspace_id, exclusive=True)
    feature = get_feature(session, workspace_id, feature_id)
    if feature is None:
        raise FeatureNotFound(feature_id)
    used = usage_count(session, workspace_id, feature_id)
    if used and not force:
        raise FeatureInUse(f"feature {feature_id!r} has {used} usage records; delete with force to remove them too")
    plans = list(session.scalars(select(PlanFeature.plan_id).where(
        PlanFeature.workspace_id == workspace_id, PlanFeature.feature_id == feature_id).order_by(PlanFeature.plan_id)))
    if plans and not force:
        raise FeatureInUse(f"feature {feature_id!r} is in plan(s) {', '.join(plans)}; delete with force to remove "
                           "it from them too")
    if plans:
        session.execute(delete(PlanFeature).where(PlanFeature.workspace_id == workspace_id,
                                                  PlanFeature.feature_id == feature_id))
        counters.touch(session, workspace_id)
    if used:
        event_ids = select(Usage.event_id).where(Usage.workspace_id == workspace_id, Usage.feature_id == feature_id)
        session.execute(
            update(Event)
            .where(Event.workspace_id == workspace_id, Event.id.in_(event_ids))
            .values(status="unmapped", reason=f"feature {feature_id!r} was deleted", feature_id=None)
            .execution_options(synchronize_session=False)
        )
        session.execute(
            delete(Usage)
            .where(Usage.workspace_id == workspace_id, Usage.feature_id == feature_id)
            .execution_options(synchronize_session=False)
        )
        totals.drop(session, workspace_id, feature_id=feature_id)
        counters.touch(session, workspace_id)
    session.delete(feature)
    session.flush()
