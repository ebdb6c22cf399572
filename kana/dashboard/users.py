"""Users: search and flag filters, the user page, merges and deletes (SPEC §4.3, §4.5), the audit log."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from flask import abort, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

import kana.dashboard.charts as charts
import kana.dashboard.timeline as timeline
from kana.dashboard.common import PAGE_SIZE, actor, bp, int_arg, int_list, notice, safe_next, ws
from kana.db import SessionLocal
from kana.domain import features, flags, identity, ledger
from kana.models import Audit, DeadLetter, Event, FlagRefresh, Usage, User, utcnow
from kana.paging import keyset
from kana.services import users as user_actions
from kana.services.users import selected

FLAG_LABELS = {
    flags.MISSING_BILLING_ID: "Not connected to a billing provider",
    flags.DUPLICATE_EMAIL: "Same email address",
    flags.ANY: "Flagged (either reason)",
}
GROUPS_PER_PAGE = 20
TIMELINE_PAGE = 100
# The fields a merge can carry over, in the order the preview shows them.
MERGE_FIELDS = ("user_id", "email", "name", "billing_id", "billing_provider", "group_id", "group_name", "source")
WINDOWS = {"hour": timedelta(hours=48), "day": timedelta(days=30), "month": timedelta(days=365)}


def _flag_arg() -> str | None:
    flag = request.args.get("flag") or None
    if flag is not None and flag not in FLAG_LABELS:
        abort(400, description=f"Unknown flag {flag!r}.")
    return flag


def exact_condition(session: Session, workspace_id: int, q: str) -> Any | None:
    """Users whose user_id (or an alias of it) or email is exactly ``q``: index lookups, instant at any size."""
    needle = q.strip()
    conditions = [User.email_key == identity.email_key(needle)]
    found = identity.find_user(session, workspace_id, needle)
    if found is not None:
        conditions.append(User.kana_id == found.kana_id)
    return or_(*conditions)


def contains_condition(q: str) -> Any:
    """user_id, email or name containing ``q``, case-insensitively.

    No index helps a substring match: on a million users this is a scan of the
    workspace's users (about half a second on PostgreSQL), cut short by LIMIT when
    matches are common. That is why exact matches are tried first.
    """
    needle = q.strip().lower()
    return or_(
        func.lower(User.user_id).contains(needle, autoescape=True),
        User.email_key.contains(needle, autoescape=True),
        func.lower(User.name).contains(needle, autoescape=True),
    )


def users_page(session: Session, workspace_id: int, *, q: str = "", flag: str | None = None,
               after: int | None = None, limit: int = PAGE_SIZE,
               match: str = "auto") -> tuple[list[User], int | None, str | None]:
    """Newest users first, ``limit`` at a time; keyset on kana_id so page 20,000 costs what page 1 does.

    With a search: ``match="auto"`` shows exact user_id/alias/email matches when
    there are any, else substring matches; ``"contains"`` always searches
    substrings. Returns the users, the next page's ``after``, and which match was used.
    """
    stmt: Select = select(User).where(User.workspace_id == workspace_id)
    if flag is not None:
        stmt = stmt.where(User.kana_id.in_(flags.flagged_user_ids_query(workspace_id, flag)))
    used = None
    if q.strip():
        used = "contains"
        if match != "contains":
            exact = stmt.where(exact_condition(session, workspace_id, q))
            if session.scalar(exact.with_only_columns(User.kana_id).limit(1)) is not None:
                stmt, used = exact, "exact"
        if used == "contains":
            stmt = stmt.where(contains_condition(q))
    rows, next_after = keyset(session, stmt, User.kana_id, after=after, limit=limit, descending=True)
    return rows, next_after, used


@bp.get("/users")
def users() -> ResponseReturnValue:
    workspace_id = ws()
    q = request.args.get("q", "")[:200]
    flag = _flag_arg()
    grouped = flag == flags.DUPLICATE_EMAIL and not q.strip() and request.args.get("view") != "list"
    with SessionLocal() as s:
        row = s.get(FlagRefresh, workspace_id) if flag else None
        refreshed = row.refreshed_at if row is not None else None
        if grouped:
            summary = flags.summary(s, workspace_id, groups_limit=GROUPS_PER_PAGE,
                                    after=request.args.get("groups_cursor") or None)
            dup = summary[flags.DUPLICATE_EMAIL]
            ids = [k for g in dup["groups"] for k in g["kana_ids"]]
            by_id = {u.kana_id: u for u in s.scalars(
                select(User).where(User.workspace_id == workspace_id, User.kana_id.in_(ids)))} if ids else {}
            groups = [{"email": g["email"], "users": [by_id[k] for k in g["kana_ids"] if k in by_id]}
                      for g in dup["groups"]]
            return render_template("dashboard/users_grouped.html", groups=groups, flag=flag,
                                   flag_label=FLAG_LABELS[flag], next_cursor=dup["next_cursor"],
                                   total_groups=dup["groups_total"], count=dup["count"],
                                   refreshed_at=refreshed)
        match = "contains" if request.args.get("match") == "contains" else "auto"
        rows, next_after, used = users_page(s, workspace_id, q=q, flag=flag, after=int_arg("after"), match=match)
    return render_template("dashboard/users.html", users=rows, q=q, flag=flag, flag_labels=FLAG_LABELS,
                           next_after=next_after, paged=request.args.get("after") is not None,
                           refreshed_at=refreshed, used=used, match=match)


def _user_or_404(session: Session, workspace_id: int, kana_id: int) -> User:
    user = session.scalar(select(User).where(User.workspace_id == workspace_id, User.kana_id == kana_id))
    if user is None:
        abort(404, description=f"No user with kana_id {kana_id} in this workspace (deleted or merged away?).")
    return user


def _timeline_cursor(raw: str | None) -> tuple[datetime, int] | None:
    if not raw:
        return None
    stamp, _, event_id = raw.rpartition("_")
    try:
        return datetime.fromisoformat(stamp), int(event_id)
    except ValueError:
        abort(400, description="Invalid timeline position.")


@bp.get("/users/<id:kana_id>")
def user(kana_id: int) -> ResponseReturnValue:
    workspace_id = ws()
    window = request.args.get("window", "day")
    if window not in WINDOWS:
        window = "day"
    before = _timeline_cursor(request.args.get("before"))
    with SessionLocal() as s:
        person = _user_or_404(s, workspace_id, kana_id)
        aliases = identity.aliases_of(s, workspace_id, kana_id)
        names = {f.id: f for f in features.list_features(s, workspace_id)}
        used = list(s.scalars(
            select(Usage.feature_id).where(Usage.workspace_id == workspace_id, Usage.kana_id == kana_id)
            .group_by(Usage.feature_id).order_by(Usage.feature_id)))
        totals = [(f, names.get(f), ledger.total(s, workspace_id, kana_id, f)) for f in used]
        feature = request.args.get("feature") or (used[0] if used else None)
        chart = None
        if feature in used:
            end = ledger.step(ledger.floor(utcnow(), window), window)
            series = ledger.series(s, workspace_id, kana_id, feature, end - WINDOWS[window], end, window)
            fmt = {"hour": "%d %H:00", "day": "%b %d", "month": "%Y-%m"}[window]
            # Narrower: it sits in a half-width card, and the SVG scales with its box.
            chart = charts.bar_chart([(datetime.fromisoformat(p["start"]).strftime(fmt), float(p["total"]))
                                      for p in series], width=540, height=200, labels=5)
        stmt = select(Event).where(Event.workspace_id == workspace_id, Event.kana_id == kana_id)
        if before is not None:
            stamp, event_id = before
            stmt = stmt.where(or_(Event.timestamp < stamp, and_(Event.timestamp == stamp, Event.id < event_id)))
        events = list(s.scalars(stmt.order_by(Event.timestamp.desc(), Event.id.desc()).limit(TIMELINE_PAGE + 1)))
        more = len(events) > TIMELINE_PAGE
        events = events[:TIMELINE_PAGE]
        event_count = s.scalar(select(func.count()).select_from(Event)
                               .where(Event.workspace_id == workspace_id, Event.kana_id == kana_id))
        ids = [i for i in (person.user_id, *aliases) if i]
        failed = s.scalar(select(func.count()).select_from(DeadLetter)
                          .where(DeadLetter.workspace_id == workspace_id, DeadLetter.user_id.in_(ids))) if ids else 0
        audit = list(s.scalars(select(Audit).where(Audit.workspace_id == workspace_id,
                                                   Audit.survivor_kana_id == kana_id)
                               .order_by(Audit.id.desc()).limit(10)))
    older = f"{events[-1].timestamp.isoformat()}_{events[-1].id}" if more and events else None
    return render_template("dashboard/user.html", user=person, aliases=aliases, totals=totals, feature=feature,
                           window=window, chart=chart, sessions=timeline.sessions(events), older=older,
                           event_count=event_count, failed=failed, audit=audit, paged=before is not None)


# --- merge and delete ---------------------------------------------------------------------


def _counts(session: Session, workspace_id: int, ids: list[int]) -> dict[int, dict[str, int]]:
    out = {i: {"events": 0, "usage": 0} for i in ids}
    for model, key in ((Event, "events"), (Usage, "usage")):
        rows = session.execute(select(model.kana_id, func.count()).where(
            model.workspace_id == workspace_id, model.kana_id.in_(ids)).group_by(model.kana_id))
        for kana_id, n in rows:
            out[kana_id][key] = n
    return out


def _values(user: User) -> dict[str, Any]:
    return {f: getattr(user, f) for f in MERGE_FIELDS}


def _back_to_list() -> ResponseReturnValue:
    return redirect(safe_next(request.values.get("next")) or url_for("dashboard.users"))


@bp.get("/users/merge")
def merge_preview() -> ResponseReturnValue:
    """What the merge would do: it is run for real in a transaction that is then rolled back.

    So the preview is the merge itself (identity.merge, the one merge function),
    not a second guess at its rules.
    """
    workspace_id = ws()
    ids = int_list(request.args.getlist("kana_id"))
    if len(ids) < 2:
        notice("Select at least two users to merge.", "error")
        return _back_to_list()
    with SessionLocal() as s:
        try:
            users_ = selected(s, workspace_id, ids)
            before = [(u.kana_id, _values(u), u.created_at) for u in users_]
            counts = _counts(s, workspace_id, ids)
            survivor = identity.merge(s, workspace_id, users_, trigger="dashboard", actor=actor())
            after = _values(survivor)
            aliases = identity.aliases_of(s, workspace_id, survivor.kana_id)
            survivor_id = survivor.kana_id
        except identity.Conflict as exc:
            abort(409, description=str(exc))
        finally:
            s.rollback()
    survivor_before = next(values for kana_id, values, _ in before if kana_id == survivor_id)
    origin = {}
    for field in MERGE_FIELDS:
        if after[field] is None or after[field] == survivor_before[field]:
            origin[field] = None
        else:
            origin[field] = next((k for k, values, _ in before if values[field] == after[field]), None)
    # What the merged-away users hold that the survivor will not (their user_ids live on as aliases).
    same = {"email": lambda a, b: identity.email_key(a) == identity.email_key(b)}
    dropped = [(field, values[field], kana_id) for kana_id, values, _ in before if kana_id != survivor_id
               for field in MERGE_FIELDS if field not in ("user_id", "source") and values[field] is not None
               and not same.get(field, lambda a, b: a == b)(values[field], after[field])]
    return render_template("dashboard/merge.html", before=before, after=after, origin=origin, counts=counts,
                           survivor_id=survivor_id, aliases=aliases, fields=MERGE_FIELDS, ids=ids, dropped=dropped,
                           next=safe_next(request.args.get("next")) or "")


@bp.post("/users/merge")
def merge() -> ResponseReturnValue:
    workspace_id = ws()
    ids = int_list(request.form.getlist("kana_id"))
    if len(ids) < 2:
        notice("Select at least two users to merge.", "error")
        return _back_to_list()
    result = user_actions.merge(workspace_id, ids, trigger="dashboard", actor=actor())
    survivor_id, audit_id = result.user["kana_id"], result.audit_id
    merged = ", ".join(f"#{i}" for i in ids if i != survivor_id)
    notice(f"Merged {merged} into #{survivor_id} (audit entry #{audit_id}).")
    return redirect(url_for("dashboard.user", kana_id=survivor_id))


@bp.get("/users/delete")
def delete_confirm() -> ResponseReturnValue:
    workspace_id = ws()
    ids = int_list(request.args.getlist("kana_id"))
    if not ids:
        notice("Select the users to delete.", "error")
        return _back_to_list()
    with SessionLocal() as s:
        users_ = selected(s, workspace_id, ids)
        counts = _counts(s, workspace_id, ids)
    return render_template("dashboard/delete.html", users=users_, counts=counts,
                           next=safe_next(request.args.get("next")) or "")


@bp.post("/users/delete")
def delete() -> ResponseReturnValue:
    workspace_id = ws()
    ids = int_list(request.form.getlist("kana_id"))
    if not ids:
        notice("Select the users to delete.", "error")
        return _back_to_list()
    deleted = user_actions.delete(workspace_id, ids, trigger="dashboard", actor=actor())
    notice(f"Deleted {deleted} user{'s' if deleted != 1 else ''} with their events and usage.")
    target = safe_next(request.form.get("next"))
    # Don't send the operator back to the page of a user that no longer exists.
    if target and target.split("?")[0] in {url_for("dashboard.user", kana_id=i) for i in ids}:
        target = None
    return redirect(target or url_for("dashboard.users"))


# --- audit ------------------------------------------------------------------------------


@bp.get("/audit")
def audit() -> ResponseReturnValue:
    workspace_id = ws()
    before = int_arg("before")
    stmt = select(Audit).where(Audit.workspace_id == workspace_id)
    with SessionLocal() as s:
        rows, older = keyset(s, stmt, Audit.id, after=before, limit=PAGE_SIZE, descending=True)
    return render_template("dashboard/audit.html", rows=rows, older=older, paged=before is not None)
