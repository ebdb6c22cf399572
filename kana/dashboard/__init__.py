"""The operator dashboard (SPEC §8): server-rendered pages behind a login.

Everything under ``/dashboard`` needs a logged-in dashboard admin, who only
ever sees their own workspace; the mounted rq-dashboard (``/rq``) shows every
workspace's jobs and needs an installation operator (``kana.dashboard.rq_mount``). Forms carry
CSRF tokens (Flask-WTF), checked for this blueprint only: the receiver and the
JSON API authenticate with API keys, not cookies, so CSRF does not apply there.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Flask, redirect, url_for
from flask.typing import ResponseReturnValue

from kana import runtime


def init_app(app: Flask) -> None:
    """Register the dashboard, its session and CSRF settings, ``/`` → dashboard, and ``/rq``."""
    settings = runtime.of(app).settings
    app.config.update(
        SESSION_COOKIE_NAME="kana_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.session_cookie_secure,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        # Checked by the dashboard's own before_request, not app-wide (see the module doc).
        WTF_CSRF_CHECK_DEFAULT=False,
        # The token lives as long as the session: a page left open for an hour still submits.
        WTF_CSRF_TIME_LIMIT=None,
    )
    # The page modules register their routes on bp when imported.
    import kana.dashboard.login
    import kana.dashboard.mapping
    import kana.dashboard.ops
    import kana.dashboard.overview
    import kana.dashboard.plans
    import kana.dashboard.users  # noqa: F401
    from kana.dashboard import rq_mount
    from kana.dashboard.common import bp, csrf

    csrf.init_app(app)

    app.register_blueprint(bp)
    app.add_url_rule("/", "root", _root)
    rq_mount.mount(app)


def _root() -> ResponseReturnValue:
    return redirect(url_for("dashboard.overview"))
