"""Features (SPEC §7, §10): creating one queues the reprocessing of stored events that name it."""

from __future__ import annotations

from flask import jsonify, url_for
from flask.typing import ResponseReturnValue
from marshmallow import Schema, ValidationError, fields, validate

from kana import auth
from kana.api.common import StrictSchema, body, bp, doc, query, text
from kana.domain import features
from kana.runtime import current
from kana.serializers import FeatureOut
from kana.services import features as feature_actions

# How to queue the reprocessing a Redis outage left out.
REQUEUE_HINT = " Queue it with POST /api/v1/rules/reprocess."


def _slug(value: str) -> None:
    if not features.SLUG.fullmatch(value):
        raise ValidationError(
            "Must be a slug: 1-100 lower-case letters, digits, '_' or '-', starting with a letter or digit.")


class FeatureCreate(StrictSchema):
    # The document states the pattern as an ECMA-262 regex (what OpenAPI patterns are); the
    # check is Python's full match of the same slug.
    id = fields.String(required=True, validate=_slug, metadata={"pattern": f"^{features.SLUG.pattern}$"})
    name = text(max_length=200)
    type = fields.String(load_default="consumable", validate=validate.OneOf(features.TYPES))


class FeatureUpdate(StrictSchema):
    name = text(max_length=200)
    type = fields.String(load_default=None, validate=validate.OneOf(features.TYPES))


class FeatureDeleteQuery(StrictSchema):
    force = fields.Boolean(load_default=False,
                           metadata={"description": "also delete the feature's usage (its events become unmapped)"})


class FeatureList(Schema):
    features = fields.List(fields.Nested(FeatureOut), required=True)


class ReprocessJob(Schema):
    """What a saved change answers about the reprocessing that follows it."""

    job_id = fields.String(allow_none=True, metadata={
        "description": "The reprocessing job (GET /api/v1/jobs/{job_id}); null if Redis was down."})
    reprocess_error = fields.String()


class FeatureWithJob(FeatureOut, ReprocessJob):
    pass


def with_hint(result: dict) -> dict:
    if result.get("reprocess_error"):
        result["reprocess_error"] += REQUEUE_HINT
    return result


@bp.post("/features")
@doc("createFeature", "Create a feature", body=FeatureCreate, status=201, response=FeatureWithJob)
def create_feature() -> ResponseReturnValue:
    data = body(FeatureCreate)
    result = feature_actions.create(current(), auth.workspace_id(), data["id"], data["name"], data["type"])
    return jsonify(with_hint(result)), 201, {"Location": url_for("api.get_feature", feature_id=result["id"])}


@bp.get("/features")
@doc("listFeatures", "List features", response=FeatureList)
def list_features() -> ResponseReturnValue:
    return jsonify({"features": feature_actions.listed(auth.workspace_id())})


@bp.get("/features/<feature_id>")
@doc("getFeature", "A feature", response=FeatureOut)
def get_feature(feature_id: str) -> ResponseReturnValue:
    return jsonify(feature_actions.get(auth.workspace_id(), feature_id))


@bp.patch("/features/<feature_id>")
@doc("updateFeature", "Rename or retype a feature", body=FeatureUpdate, response=FeatureOut)
def update_feature(feature_id: str) -> ResponseReturnValue:
    data = body(FeatureUpdate)
    return jsonify(feature_actions.update(auth.workspace_id(), feature_id, name=data["name"], kind=data["type"]))


@bp.delete("/features/<feature_id>")
@doc("deleteFeature", "Delete a feature (with force: and its usage)", query=FeatureDeleteQuery, status=204)
def delete_feature(feature_id: str) -> ResponseReturnValue:
    args = query(FeatureDeleteQuery)
    try:
        feature_actions.delete(auth.workspace_id(), feature_id, force=args["force"])
    except features.FeatureInUse as exc:
        raise features.FeatureInUse(f"{exc}: add ?force=true.") from None
    return "", 204
