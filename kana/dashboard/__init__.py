"""The operator dashboard (SPEC §8): server-rendered pages behind a login.

Everything under ``/dashboard`` needs a logged-in dashboard admin, who only
ever sees their own workspace; the mounted rq-dashboard (``/rq``) shows every
workspace's jobs and needs an installation operator (``kana.dashboard.rq_mount``). Forms carry
CSRF tokens (Flask-WTF), checked for this blueprint only: the receiver and the
JSON API authenticate with API keys, not cookies, so CSRF does not apply there.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Flask, Request, redirect, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask.typing import ResponseReturnValue
from itsdangerous import URLSafeTimedSerializer

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

    app.session_interface = CookieSessions()
    csrf.init_app(app)

    app.register_blueprint(bp)
    app.add_url_rule("/", "root", _root)
    rq_mount.mount(app)


def _root() -> ResponseReturnValue:
    return redirect(url_for("dashboard.overview"))


class CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, made cheap for the requests that carry no session cookie.

    Flask opens the session of every request, the API's and the receiver's too,
    and its interface builds a new signing serializer each time; here it is built
    once per set of keys, and a request without the cookie gets its empty session
    without it. A cookie is read and written exactly as Flask does.
    """

    def __init__(self) -> None:
        self._serializer: tuple[Any, URLSafeTimedSerializer | None] = (None, None)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        keys = (app.secret_key, tuple(app.config["SECRET_KEY_FALLBACKS"] or ()))
        built_for, serializer = self._serializer
        if built_for != keys:
            serializer = super().get_signing_serializer(app)
            self._serializer = (keys, serializer)  # one tuple: threads see a matching pair
        return serializer

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and ("HTTP_COOKIE" not in request.environ
                               or not request.cookies.get(self.get_cookie_name(app))):
            return self.session_class()
        return super().open_session(app, request)
