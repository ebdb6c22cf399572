"""The admin JSON API under ``/api/v1`` (SPEC §8, §10), one module per resource.

Each view parses its input, calls one ``kana.services`` action (or reads), and
renders JSON; errors are rendered in one place (``common.register_errors``).
"""

from __future__ import annotations

from flask import Flask

from kana.api import (
    common,
    entitlements,
    events,
    features,
    flags,
    imports,
    jobs,
    keys,
    openapi,
    plans,
    rules,
    usage,
    users,
    webhook,
    workspace,
)

RESOURCES = (users, usage, features, rules, events, imports, flags, jobs, workspace, keys, plans, entitlements, webhook,
             openapi)


def init_app(app: Flask) -> None:
    """Register the API's routes (every resource module adds its own to ``common.bp``) and its JSON errors."""
    common.register_errors(app)
    app.register_blueprint(common.bp)
