"""The web process: Segment receiver, admin API, health and metrics."""

from __future__ import annotations

from flask import Flask

import config
from config import Settings
from kana import keepalive, routing, runtime
from kana.runtime import Runtime


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or config.load()
    app = Flask("kana")
    app.config.update(SECRET_KEY=settings.secret_key, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    runtime.install(app, Runtime(settings))
    routing.install(app)  # <id:…> and <job:…> in routes
    keepalive.install(app)  # early answers (413 …) leave the connection usable

    from kana import api, dashboard, health
    from kana.ingest import receiver

    api.init_app(app)  # also the JSON error bodies the receiver answers with
    app.register_blueprint(receiver.bp)
    app.register_blueprint(health.bp)
    dashboard.init_app(app)  # operator dashboard at /dashboard, rq-dashboard at /rq
    return app


app = create_app()
