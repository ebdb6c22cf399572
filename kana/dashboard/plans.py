"""Dashboard pages for plans, the webhook and its deliveries, and a user's entitlements (SPEC §11)."""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import abort, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from redis.exceptions import RedisError

from kana.dashboard.common import bp, int_arg, notice, ws
from kana.db import SessionLocal
from kana.domain import entitlements, plans, webhooks
from kana.models import User, Workspace
from kana.runtime import current

log = logging.getLogger(__name__)
PAGE = 50


@bp.app_template_global()
def user_entitlements(user: User) -> dict[str, Any]:
    """For the user page: the user's plan, its features with used/limit/remaining, and the plans to pick."""
    with SessionLocal() as s:
        return {"plan_id": user.plan_id, "rows": entitlements.user_entitlements(s, user.workspace_id, user),
                "plans": [p.id for p in plans.list_plans(s, user.workspace_id)]}


@bp.get("/plans")
def plans_page() -> ResponseReturnValue:
    with SessionLocal() as s:
        rows = [plans.to_dict(s, p) for p in plans.list_plans(s, ws())]
    return render_template("dashboard/plans.html", plans=rows, periods=plans.PERIODS)


@bp.post("/plans")
def create_plan() -> ResponseReturnValue:
    form = request.form
    try:
        items = json.loads(form.get("features") or "[]")
    except ValueError as exc:
        notice(f"Features must be JSON: {exc}", "error")
        return redirect(url_for("dashboard.plans_page"))
    try:
        with SessionLocal.begin() as s:
            plan = plans.create_plan(s, ws(), {"id": form.get("id", ""), "name": form.get("name") or form.get("id"),
                                                "features": items})
            plan_id = plan.id
    except plans.PlanError as exc:
        notice(f"Plan not created: {exc}", "error")
        return redirect(url_for("dashboard.plans_page"))
    notice(f"Plan {plan_id} created.")
    return redirect(url_for("dashboard.plans_page"))


@bp.post("/users/<int:kana_id>/plan")
def assign_plan(kana_id: int) -> ResponseReturnValue:
    plan_id = request.form.get("plan_id") or None
    try:
        with SessionLocal.begin() as s:
            if plans.assign(s, ws(), kana_id, plan_id) is None:
                abort(404, description=f"No user with kana_id {kana_id} in this workspace.")
    except plans.PlanError as exc:
        notice(str(exc), "error")
    else:
        notice(f"Plan set to {plan_id}." if plan_id else "Plan removed.")
    return redirect(url_for("dashboard.user", kana_id=kana_id))


@bp.get("/webhook")
def webhook_page() -> ResponseReturnValue:
    before = int_arg("before")
    with SessionLocal() as s:
        workspace = s.get(Workspace, ws())
        rows = webhooks.list_deliveries(s, ws(), before=before, limit=PAGE)
        url = workspace.webhook_url if workspace else None
    older = rows[-1].id if len(rows) == PAGE else None
    return render_template("dashboard/webhook.html", url=url, rows=rows, older=older, paged=before is not None)


@bp.post("/webhook")
def set_webhook() -> ResponseReturnValue:
    allow_private = current().settings.webhook_allow_private
    try:
        with SessionLocal.begin() as s:
            url, secret = webhooks.set_webhook(s, ws(), request.form.get("url"), allow_private=allow_private)
    except webhooks.WebhookError as exc:
        notice(f"Webhook URL refused: {exc.message}", "error")
        return redirect(url_for("dashboard.webhook_page"))
    notice(f"Webhook set to {url}. Signing secret (shown once, store it now): {secret}")
    return redirect(url_for("dashboard.webhook_page"))


@bp.post("/webhook/deliveries/<int:delivery_id>/retry")
def retry_delivery(delivery_id: int) -> ResponseReturnValue:
    with SessionLocal.begin() as s:
        row = webhooks.retry(s, ws(), delivery_id)
        if row is None:
            abort(404, description=f"No webhook delivery {delivery_id} in this workspace.")
        pending = row.status == "pending"
    if pending:
        try:
            webhooks.enqueue(current().queue, [delivery_id])
        except RedisError as exc:
            # Still due: the scheduler's sweep sends it once Redis is back.
            log.warning("delivery %s re-armed but not queued: %s", delivery_id, exc)
    notice(f"Delivery {delivery_id} is sent again shortly." if pending else f"Delivery {delivery_id} was delivered.")
    return redirect(url_for("dashboard.webhook_page"))
