"""Features usage is recorded against (SPEC §7)."""

from __future__ import annotations

from typing import Any

from kana.db import SessionLocal
from kana.domain import features
from kana.runtime import Runtime
from kana.serializers import feature_json
from kana.services.rules import reprocess_after


def require(session: Any, workspace_id: int, feature_id: str) -> None:
    """FeatureNotFound unless the workspace has this feature."""
    # Anything but a slug cannot be a feature id (and may not even be storable text).
    if features.SLUG.fullmatch(feature_id) is None or features.get_feature(session, workspace_id, feature_id) is None:
        raise features.FeatureNotFound(feature_id)


def get(workspace_id: int, feature_id: str) -> dict[str, Any]:
    with SessionLocal.begin() as s:
        require(s, workspace_id, feature_id)
        return feature_json(features.get_feature(s, workspace_id, feature_id))


def listed(workspace_id: int) -> list[dict[str, Any]]:
    with SessionLocal.begin() as s:
        return [feature_json(f) for f in features.list_features(s, workspace_id)]


def create(rt: Runtime, workspace_id: int, feature_id: str, name: str | None, kind: str) -> dict[str, Any]:
    """Create a feature, then reprocess: events stored as "unknown featureId" for it now map (SPEC §7)."""
    with SessionLocal.begin() as s:
        body = feature_json(features.create_feature(s, workspace_id, feature_id, name, kind))
    body.update(reprocess_after(rt, workspace_id, f"feature {body['id']} created"))
    return body


def update(workspace_id: int, feature_id: str, *, name: str | None, kind: str | None) -> dict[str, Any]:
    with SessionLocal.begin() as s:
        require(s, workspace_id, feature_id)
        return feature_json(features.update_feature(s, workspace_id, feature_id, name=name, type=kind))


def delete(workspace_id: int, feature_id: str, *, force: bool = False) -> None:
    """Delete a feature (with ``force``: and its usage). No reprocessing: a feature re-created later picks
    its events up again."""
    with SessionLocal.begin() as s:
        require(s, workspace_id, feature_id)
        features.delete_feature(s, workspace_id, feature_id, force=force)
