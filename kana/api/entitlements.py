"""The entitlement check (SPEC §10, §11): Kana's canUseFeature, for admin keys and ``check`` keys.

The hot path: the key from the process's key cache, one Redis round trip, the
answer. The database is read only on a cache miss (or with Redis down).
"""

from __future__ import annotations

from decimal import Decimal

from flask import jsonify
from flask.typing import ResponseReturnValue
from marshmallow import fields, validate

from kana import auth
from kana.api.common import StrictSchema, bp, doc, query, text
from kana.domain.plans import MAX_LIMIT
from kana.runtime import current
from kana.serializers import EntitlementOut
from kana.services import plans as plan_actions

MAX_TEXT = 1000


class CheckQuery(StrictSchema):
    user_id = text(required=True, max_length=MAX_TEXT,
                   metadata={"description": "The user's id, an alias, or a merged-away id."})
    feature_id = text(required=True, max_length=MAX_TEXT)
    delta = fields.Decimal(load_default=Decimal(1), allow_nan=False, validate=validate.Range(0, MAX_LIMIT),
                           metadata={"description": "The usage about to happen.", "default": 1,
                                     "minimum": 0, "maximum": MAX_LIMIT})  # numbers, not a Decimal's strings


@bp.get("/entitlements/check")
@doc("checkEntitlement", "May this user use this feature now (canUseFeature)? Admin key or a key of scope check.",
     query=CheckQuery, response=EntitlementOut, errors=(400, 401, 403), scope="check")
def check() -> ResponseReturnValue:
    args = query(CheckQuery)
    return jsonify(plan_actions.check(current(), auth.workspace_id(), args["user_id"], args["feature_id"],
                                      args["delta"]))
