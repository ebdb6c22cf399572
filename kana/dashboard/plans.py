"""Dashboard pages for plans, the webhook and its deliveries, and a user's entitlements (SPEC §11)."""

from __future__ import annotations

import json
from typing import Any

from flask import redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from kana.dashboard.common import back_to, bp, int_arg, notice, ws
from kana.db import SessionLocal
from kana.domain import webhooks
from kana.errors import field_error
from kana.models import User, Workspace
from kana.runtime import current
from kana.serializers import PERIODS
from kana.services import plans as plan_actions
from kana.services import webhooks as webhook_actions

PAGE = 50


@bp.app_template_global()
def user_entitlements(user: User) -> dict[str, Any]:
    """For the user page: the user's plan, its features with used/limit/remaining, and the plans to pick."""
    held = plan_actions.user_entitlements(user.workspace_id, user.kana_id)
    return {"plan_id": held["plan_id"], "rows": held["entitlements"],
            "plans": [p["id"] for p in plan_actions.listed(user.workspace_id)]}


@bp.get("/plans")
def plans_page() -> ResponseReturnValue:
    return render_template("dashboard/plans.html", plans=plan_actions.listed(ws()), periods=PERIODS)


@bp.post("/plans")
def create_plan() -> ResponseReturnValue:
    back_to("dashboard.plans_page")
    form = request.form
    try:
        items = json.loads(form.get("features") or "[]")
    except ValueError as exc:
        raise field_error("features", f"must be JSON: {exc}") from None
    plan = plan_actions.create(ws(), {"id": form.get("id", ""), "name": form.get("name") or form.get("id"),
                                      "features": items})
    notice(f"Plan {plan['id']} created.")
    return redirect(url_for("dashboard.plans_page"))


@bp.post("/users/<id:kana_id>/plan")
def assign_plan(kana_id: int) -> ResponseReturnValue:
    back_to("dashboard.user", kana_id=kana_id)
    plan_id = request.form.get("plan_id") or None
    plan_actions.assign(ws(), kana_id, plan_id)
    notice(f"Plan set to {plan_id}." if plan_id else "Plan removed.")
    return redirect(url_for("dashboard.user", kana_id=kana_id))


@bp.get("/webhook")
def webhook_page() -> ResponseReturnValue:
    before = int_arg("before")
    with SessionLocal() as s:
        workspace = s.get(Workspace, ws())
        rows, older = webhooks.list_deliveries(s, ws(), before=before, limit=PAGE)
        url = workspace.webhook_url if workspace else None
    return render_template("dashboard/webhook.html", url=url, rows=rows, older=older, paged=before is not None)


@bp.post("/webhook")
def set_webhook() -> ResponseReturnValue:
    back_to("dashboard.webhook_page")
    result = webhook_actions.set_url(current(), ws(), request.form.get("url"))
    notice(f"Webhook set to {result['url']}. Signing secret (shown once, store it now): {result['secret']}")
    return redirect(url_for("dashboard.webhook_page"))


@bp.post("/webhook/deliveries/<id:delivery_id>/retry")
def retry_delivery(delivery_id: int) -> ResponseReturnValue:
    back_to("dashboard.webhook_page")
    row = webhook_actions.retry(current(), ws(), delivery_id)
    if row["status"] != "pending":
        notice(f"Delivery {delivery_id} was delivered.")
    else:
        notice(row.get("queue_error") or f"Delivery {delivery_id} is sent again shortly.",
               "error" if row.get("queue_error") else "ok")
    return redirect(url_for("dashboard.webhook_page"))
