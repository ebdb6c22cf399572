"""Features and mapping rules (SPEC §7): every change queues the reprocessing of stored unmapped
events, and the page it leads to shows that job's progress and how many events it mapped."""

from __future__ import annotations

import json
from typing import Any

from flask import redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from werkzeug.datastructures import MultiDict

from kana.dashboard.common import back_to, bp, notice, ws
from kana.db import SessionLocal
from kana.domain import features, reprocess, rules
from kana.models import Rule
from kana.runtime import current
from kana.services import features as feature_actions
from kana.services import rules as rule_actions

CONDITION_ROWS = 3  # blank condition rows offered by the form
MAX_ROWS = rules.MAX_CONDITIONS + CONDITION_ROWS


def _row_count(form: MultiDict) -> int:
    try:
        return max(0, min(int(form.get("rows", CONDITION_ROWS)), MAX_ROWS))
    except ValueError:
        return CONDITION_ROWS


def _reprocess_redirect(endpoint: str, saved: dict[str, Any]) -> ResponseReturnValue:
    """To the page showing the reprocessing job that followed a saved change (or saying it was not queued)."""
    if saved.get("job_id") is None:
        notice("Saved, but reprocessing was not queued (Redis is unreachable): use “Reprocess now” later.", "error")
        return redirect(url_for(endpoint))
    return redirect(url_for(endpoint, job=saved["job_id"]))


def _job(job_id: str | None) -> dict[str, Any] | None:
    from kana.dashboard.overview import job_state

    return job_state(job_id) if job_id else None


# --- features ---------------------------------------------------------------------------------


@bp.get("/features")
def features_page() -> ResponseReturnValue:
    workspace_id = ws()
    with SessionLocal() as s:
        rows = [(f, features.usage_count(s, workspace_id, f.id)) for f in features.list_features(s, workspace_id)]
    return render_template("dashboard/features.html", rows=rows, types=features.TYPES,
                           job=_job(request.args.get("job")), form={}, errors={})


@bp.post("/features")
def create_feature() -> ResponseReturnValue:
    workspace_id = ws()
    form = request.form
    try:
        saved = feature_actions.create(current(), workspace_id, form.get("id", "").strip(),
                                       form.get("name", "").strip() or None, form.get("type", "consumable"))
    except features.FeatureError as exc:
        with SessionLocal() as s:
            rows = [(f, features.usage_count(s, workspace_id, f.id))
                    for f in features.list_features(s, workspace_id)]
        return render_template("dashboard/features.html", rows=rows, types=features.TYPES, job=None,
                               form=form, errors={exc.field: exc.message}), 400
    notice(f"Feature {saved['id']} created.")
    return _reprocess_redirect("dashboard.features_page", saved)


def _feature_or_404(session: Any, feature_id: str) -> Any:
    feature = features.get_feature(session, ws(), feature_id)
    if feature is None:
        raise features.FeatureNotFound(feature_id)
    return feature


@bp.get("/features/<feature_id>")
def feature_page(feature_id: str) -> ResponseReturnValue:
    with SessionLocal() as s:
        feature = _feature_or_404(s, feature_id)
        used = features.usage_count(s, ws(), feature_id)
    return render_template("dashboard/feature.html", feature=feature, used=used, types=features.TYPES, errors={})


@bp.post("/features/<feature_id>")
def update_feature(feature_id: str) -> ResponseReturnValue:
    workspace_id = ws()
    try:
        feature_actions.update(workspace_id, feature_id, name=request.form.get("name", ""),
                               kind=request.form.get("type"))
    except features.FeatureError as exc:
        with SessionLocal() as s:
            feature = _feature_or_404(s, feature_id)
            used = features.usage_count(s, workspace_id, feature_id)
        return render_template("dashboard/feature.html", feature=feature, used=used, types=features.TYPES,
                               errors={exc.field: exc.message}), 400
    notice(f"Feature {feature_id} saved.")
    return redirect(url_for("dashboard.features_page"))


@bp.post("/features/<feature_id>/delete")
def delete_feature(feature_id: str) -> ResponseReturnValue:
    try:
        feature_actions.delete(ws(), feature_id, force=bool(request.form.get("force")))
    except features.FeatureInUse as exc:
        notice(f"{exc}: tick “also delete its usage” to confirm.", "error")
        return redirect(url_for("dashboard.feature_page", feature_id=feature_id))
    notice(f"Feature {feature_id} deleted.")
    return redirect(url_for("dashboard.features_page"))


# --- rules ---------------------------------------------------------------------------------


def rule_data(form: MultiDict) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The rule a form describes, for rules.create_rule/update_rule; plus errors only the form can make."""
    errors: dict[str, list[str]] = {}
    conditions = []
    for i in range(_row_count(form)):
        prop = form.get(f"cond-{i}-property", "").strip()
        if not prop:
            continue
        condition: dict[str, Any] = {"property": prop, "operator": form.get(f"cond-{i}-operator", "equals")}
        raw = form.get(f"cond-{i}-value", "")
        if raw != "" or condition["operator"] != "exists":  # exists without a value means "is present"
            condition["value"] = rule_actions.typed_value(raw)
        conditions.append(condition)
    data: dict[str, Any] = {
        "feature_id": form.get("feature_id", ""),
        "event": form.get("event", "").strip(),
        "type": form.get("type") or None,
        "conditions": conditions,
        "delta_property": form.get("delta_property", "").strip() or None,
        "enabled": bool(form.get("enabled")),
    }
    raw_priority = form.get("priority", "").strip()
    if raw_priority:
        try:
            data["priority"] = int(raw_priority)
        except ValueError:
            errors["priority"] = ["must be a whole number"]
    return data, errors


def describe(condition: dict[str, Any]) -> str:
    if "value" not in condition:
        return f"{condition['property']} {condition['operator']}"
    return f"{condition['property']} {condition['operator']} {json.dumps(condition['value'])}"


def _form_rows(rule: Rule | None) -> list[dict[str, str]]:
    rows = [{"property": c["property"], "operator": c["operator"],
             "value": json.dumps(c["value"]) if "value" in c and not isinstance(c["value"], str) else
             c.get("value", "")} for c in (rule.conditions if rule is not None else [])]
    return rows + [{"property": "", "operator": "equals", "value": ""}] * CONDITION_ROWS


def _rule_form(rule: Rule | None, form: MultiDict | None = None, errors: dict[str, list[str]] | None = None,
               status: int = 200) -> ResponseReturnValue:
    with SessionLocal() as s:
        feature_ids = [f.id for f in features.list_features(s, ws())]
    if form is not None:
        n = _row_count(form)
        rows = [{"property": form.get(f"cond-{i}-property", ""), "operator": form.get(f"cond-{i}-operator", ""),
                 "value": form.get(f"cond-{i}-value", "")} for i in range(n)]
        values = {k: form.get(k, "") for k in ("type", "event", "feature_id", "delta_property", "priority")}
        values["enabled"] = bool(form.get("enabled"))
    else:
        rows = _form_rows(rule)
        values = {"type": rule.type or "", "event": rule.event, "feature_id": rule.feature_id,
                  "delta_property": rule.delta_property or "", "priority": rule.priority,
                  "enabled": rule.enabled} if rule is not None else \
            {"type": "", "event": "", "feature_id": "", "delta_property": "", "priority": rules.DEFAULT_PRIORITY,
             "enabled": True}
    return render_template("dashboard/rule_form.html", rule=rule, values=values, rows=rows, errors=errors or {},
                           feature_ids=feature_ids, operators=rules.OPERATORS, types=rules.CALL_TYPES), status


@bp.get("/rules")
def rules_page() -> ResponseReturnValue:
    workspace_id = ws()
    with SessionLocal() as s:
        rows = rules.list_rules(s, workspace_id)
        unmapped = reprocess.count_unmapped(s, workspace_id)
    return render_template("dashboard/rules.html", rows=rows, describe=describe, unmapped=unmapped,
                           job=_job(request.args.get("job")))


@bp.get("/rules/new")
def new_rule() -> ResponseReturnValue:
    return _rule_form(None)


@bp.post("/rules")
def create_rule() -> ResponseReturnValue:
    data, errors = rule_data(request.form)
    if errors:
        return _rule_form(None, request.form, errors, 400)
    try:
        saved = rule_actions.create(current(), ws(), data)
    except rules.RuleError as exc:
        return _rule_form(None, request.form, exc.errors, 400)
    notice(f"Rule {saved['id']} created.")
    return _reprocess_redirect("dashboard.rules_page", saved)


def _rule_or_404(session: Any, rule_id: int) -> Rule:
    return rules.get_rule(session, ws(), rule_id)  # RuleNotFound: the 404 page


@bp.get("/rules/<id:rule_id>")
def edit_rule(rule_id: int) -> ResponseReturnValue:
    with SessionLocal() as s:
        rule = _rule_or_404(s, rule_id)
    return _rule_form(rule)


@bp.post("/rules/<id:rule_id>")
def update_rule(rule_id: int) -> ResponseReturnValue:
    with SessionLocal() as s:
        rule = _rule_or_404(s, rule_id)
    data, errors = rule_data(request.form)
    if errors:
        return _rule_form(rule, request.form, errors, 400)
    try:
        saved = rule_actions.update(current(), ws(), rule_id, data)
    except rules.RuleError as exc:
        return _rule_form(rule, request.form, exc.errors, 400)
    notice(f"Rule {rule_id} saved.")
    return _reprocess_redirect("dashboard.rules_page", saved)


@bp.post("/rules/<id:rule_id>/delete")
def delete_rule(rule_id: int) -> ResponseReturnValue:
    rule_actions.delete(ws(), rule_id)
    notice(f"Rule {rule_id} deleted (usage it recorded stays in the ledger).")
    return redirect(url_for("dashboard.rules_page"))


@bp.post("/rules/reprocess")
def reprocess_now() -> ResponseReturnValue:
    back_to("dashboard.rules_page")
    job_id = rule_actions.request_reprocess(current(), ws(), why="requested from the dashboard")
    return redirect(url_for("dashboard.rules_page", job=job_id))
