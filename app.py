"""The web process: Segment receiver, admin API, health and metrics."""

from __future__ import annotations

from flask import Flask

import config
from config import Settings
from kana import errors
from kana.runtime import Runtime


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or config.load()
    app = Flask("kana")
    app.config.update(SECRET_KEY=settings.secret_key, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    app.extensions["kana"] = Runtime(settings)
    errors.register(app)

    from kana import health
    from kana.api import ops as api_ops
    from kana.api import rules as api_rules
    from kana.api import users as api
    from kana.ingest import receiver

    app.register_blueprint(receiver.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(api_rules.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(api_ops.bp)
    from kana.api import entitlements as api_entitlements
    from kana.api import plans as api_plans
    from kana.api import webhook as api_webhook

    app.register_blueprint(api_plans.bp)
    app.register_blueprint(api_entitlements.bp)
    app.register_blueprint(api_webhook.bp)
    from kana import dashboard  # operator dashboard at /dashboard, rq-dashboard at /rq
    dashboard.init_app(app)
    return app


app = create_app()
