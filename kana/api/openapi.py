"""The OpenAPI 3 document of the admin API, served at ``/api/v1/openapi.json``.

Built one way, from the routes: every view of the API blueprint carries an
``Operation`` (``kana.api.common.doc``) naming the marshmallow schemas it
validates its input with and answers with (``kana.serializers`` and the
resource modules), and the path and its parameters come from the URL rule.
So the document cannot drift from what the API accepts and returns;
tests/test_api.py checks that every route is described.
"""

from __future__ import annotations

import re
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, current_app, jsonify
from flask.typing import ResponseReturnValue

from kana.api.common import PUBLIC, Operation, bp
from kana.api.events import COMPONENTS
from kana.routing import CONVERTERS
from kana.serializers import Error

ERRORS = {
    400: ("InvalidRequest", "Invalid input; `errors` names each offending field"),
    401: ("Unauthorized", "Missing, unknown or revoked API key"),
    403: ("Forbidden", "An ingest key; the admin API needs an admin key"),
    404: ("NotFound", "No such resource in this workspace"),
    409: ("Conflict", "The change conflicts with existing data"),
    413: ("TooLarge", "File larger than the upload limit"),
    503: ("Unavailable", "Redis is unreachable; retry"),
}
_PARAM = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")
EXTENSION = "kana.openapi"


def _path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    """An OpenAPI path and its parameters from a Flask URL rule (``<id:kana_id>`` → ``{kana_id}``)."""
    parameters = [
        {"in": "path", "name": name, "required": True,
         "schema": dict(getattr(CONVERTERS.get(converter), "openapi", {"type": "string"}))}
        for converter, name in _PARAM.findall(rule)
    ]
    return _PARAM.sub(r"{\2}", rule), parameters


def _operation(op: Operation, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [tag], "parameters": []}
    if op.query is not None:
        out["parameters"].append({"in": "query", "schema": op.query})
    if op.body is not None:
        media = "multipart/form-data" if op.upload else "application/json"
        out["requestBody"] = {"required": True, "content": {media: {"schema": op.body}}}
    if op.response is None:
        ok: dict[str, Any] = {"description": "Done"}
    elif isinstance(op.response, str):  # a text body described in words
        ok = {"description": op.response, "content": {op.media: {"schema": {"type": "string"}}}}
    else:
        ok = {"description": "OK", "content": {op.media: {"schema": op.response}}}
    out["responses"] = {str(op.status): ok, **{str(code): ERRORS[code][0] for code in op.errors}}
    return out


def build(app: Flask) -> APISpec:
    spec = APISpec(
        title="Kana admin API",
        version="1",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={
            "description": "Users, usage, features, rules, events and jobs of one workspace. "
            "Authenticate with the workspace's admin key: `Authorization: Bearer KEY` "
            "(or HTTP Basic with the key as user name, as Segment sends it)."
        },
        servers=[{"url": "/"}],
        security=[{"bearer": []}, {"basic": []}],
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("basic", {"type": "http", "scheme": "basic"})
    spec.components.schema("Error", schema=Error)
    for name, description in ERRORS.values():
        spec.components.response(
            name, {"description": description, "content": {"application/json": {"schema": "Error"}}}
        )
    for name, schema in COMPONENTS.items():
        spec.components.schema(name, schema=schema)

    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith(f"{bp.name}.") or rule.endpoint in PUBLIC:
            continue
        view = app.view_functions[rule.endpoint]
        op: Operation = view.openapi
        tag = view.__module__.rsplit(".", 1)[-1]  # the resource module
        path, parameters = _path(rule.rule)
        item = paths.setdefault(path, {"parameters": parameters})
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            item[method.lower()] = _operation(op, tag)
    for path, item in paths.items():
        parameters = item.pop("parameters")
        spec.path(path=path, operations=item, parameters=parameters or None)
    spec.path(path=f"{bp.url_prefix}/openapi.json", operations={"get": {
        "operationId": "getOpenAPI", "summary": "This document", "security": [],
        "responses": {"200": {"description": "OpenAPI 3 document", "content": {"application/json": {}}}},
    }})
    return spec


def spec_dict(app: Flask) -> dict[str, Any]:
    """The document as a dict, built once per app."""
    if EXTENSION not in app.extensions:
        app.extensions[EXTENSION] = build(app).to_dict()
    return app.extensions[EXTENSION]


@bp.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    return jsonify(spec_dict(current_app))
