"""API keys of the workspace (SPEC §8): list, create (shown once), revoke."""

from __future__ import annotations

from flask import jsonify
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields, validate

from kana import auth, runtime
from kana.api.common import StrictSchema, body, bp, doc, text
from kana.db import SessionLocal
from kana.domain import keys
from kana.serializers import KeyOut, key_json
from kana.services import keys as key_actions


class KeyCreate(StrictSchema):
    scope = fields.String(required=True, validate=validate.OneOf(keys.SCOPES))
    name = text(max_length=200)


class KeyCreated(KeyOut):
    api_key = fields.String(required=True, metadata={"description": "shown once; only its hash is stored"})


class KeyList(Schema):
    keys = fields.List(fields.Nested(KeyOut), required=True)


@bp.get("/keys")
@doc("listKeys", "API keys of the workspace", response=KeyList)
def list_keys() -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        result = {"keys": [key_json(k) for k in keys.list_keys(s, auth.workspace_id())]}
    return jsonify(result)


@bp.post("/keys")
@doc("createKey", "Create an API key (shown once)", body=KeyCreate, status=201, response=KeyCreated)
def create_key() -> ResponseReturnValue:
    data = body(KeyCreate)
    return jsonify(key_actions.create(auth.workspace_id(), data["scope"], data["name"])), 201


@bp.delete("/keys/<id:key_id>")
@doc("revokeKey", "Revoke an API key", status=204)
def revoke_key(key_id: int) -> ResponseReturnValue:
    key_actions.revoke(auth.workspace_id(), key_id, redis=runtime.current().redis)
    return "", 204
