"""Entitlement checks (SPEC §11, Kana's canUseFeature) and the Redis cache that answers them.

The cache, per workspace, under a generation number ``g`` (``kana:ent:{ws}:gen``):

* ``…:{g}:id:{user_id}`` → ``"{kana_id}|{plan_id}"``: who a user_id is (aliases and
  merged-away ids resolved) and the user's plan;
* ``…:{g}:plan:{plan_id}`` → hash ``feature_id`` → ``"{period letter}|{type}|{limit}|{overage}"``
  (plus ``_`` so a plan without features is still a hit);
* ``…:{g}:used:{kana_id}`` → hash ``"{feature_id}|{period key}"`` → the exact usage total.

Workers write the totals of the (user, feature) pairs a chunk touched, as absolute
values read in the chunk's transaction (from ``kana.domain.totals``, kept beside the
ledger), after it commits (so a retried chunk writes the same numbers). Anything else
that changes who a user is, a plan, or usage in bulk (merges, deletes,
reprocessing, plan changes) calls ``counters.touch``: after its commit the
generation moves on and the whole workspace's cache refills from PostgreSQL on
the next checks. A generation is always read before the database, so a refill
racing a change can only write under a generation nobody reads any more.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import RedisError
from sqlalchemy import and_, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from kana.db import read_only
from kana.domain import counters, identity, ledger, totals
from kana.models import Alert, Feature, PlanFeature, User, WebhookDelivery, Workspace
from kana.serializers import amount

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ALERT_TYPE = "usage.threshold_crossed"



# --- periods ---------------------------------------------------------------


def period_bounds(period: str, now: datetime) -> tuple[datetime | None, datetime | None]:
    """The calendar-UTC period containing ``now``: ``[start, end)``; (None, None) for lifetime."""
    if period == "none":
        return None, None
    start = ledger.floor(now, period)
    return start, ledger.step(start, period)


def period_key(period: str, now: datetime) -> str:
    """A period's name in cache keys: ``2026-11`` (month), ``2026-11-30`` (day), ``all``."""
    moment = now.astimezone(UTC)
    if period == "month":
        return moment.strftime("%Y-%m")
    if period == "day":
        return moment.strftime("%Y-%m-%d")
    return "all"


# --- the answer --------------------------------------------------------------


@dataclass(frozen=True)
class Entitlement:
    feature_id: str
    type: str
    limit: Decimal | None
    period: str
    overage: bool


def number(value: Decimal | None) -> int | float | None:
    """An amount as a JSON number (None stays None: unlimited)."""
    return None if value is None else amount(value)


def answer(ent: Entitlement | None, used: Decimal, delta: Decimal, now: datetime, reason: str | None = None
           ) -> dict[str, Any]:
    """The check's JSON answer (SPEC §10) for an entitlement (None: ``reason`` says why not)."""
    if ent is None:
        return {"access": False, "reason": reason, "used": 0, "limit": None, "remaining": None,
                "overage": False, "period_start": None, "period_end": None}
    start, end = period_bounds(ent.period, now) if ent.type == "consumable" else (None, None)
    body: dict[str, Any] = {"access": True}
    if ent.type == "consumable" and ent.limit is not None and used + delta > ent.limit and not ent.overage:
        body = {"access": False, "reason": "limit_exceeded"}
    remaining = None if ent.limit is None else max(ent.limit - used, Decimal(0))
    body.update(used=number(used), limit=number(ent.limit), remaining=number(remaining), overage=ent.overage,
                period_start=start.isoformat() if start else None, period_end=end.isoformat() if end else None)
    return body


# --- database side -------------------------------------------------------------


def _entitlement(feature_type: str, pf: PlanFeature) -> Entitlement:
    return Entitlement(pf.feature_id, feature_type, pf.limit, pf.period, pf.overage)


def plan_entitlements(session: Session, workspace_id: int, plan_id: str) -> dict[str, Entitlement]:
    rows = session.execute(
        select(PlanFeature, Feature.type)
        .join(Feature, and_(Feature.workspace_id == PlanFeature.workspace_id, Feature.id == PlanFeature.feature_id))
        .where(PlanFeature.workspace_id == workspace_id, PlanFeature.plan_id == plan_id)
        .order_by(PlanFeature.feature_id)
    ).all()
    return {pf.feature_id: _entitlement(kind, pf) for pf, kind in rows}


def used(session: Session, workspace_id: int, kana_id: int, feature_id: str, period: str, now: datetime) -> Decimal:
    """Exactly the ledger's usage in the current period (merged users' usage moved to the survivor)."""
    return totals.total(session, workspace_id, kana_id, feature_id, period, period_bounds(period, now)[0])


def user_entitlements(session: Session, workspace_id: int, user: User, now: datetime | None = None
                      ) -> list[dict[str, Any]]:
    """Every feature of the user's plan with used/limit/remaining (the user page, the API)."""
    now = now or datetime.now(UTC)
    if user.plan_id is None:
        return []
    out = []
    for feature_id, ent in plan_entitlements(session, workspace_id, user.plan_id).items():
        total = used(session, workspace_id, user.kana_id, feature_id, ent.period, now) \
            if ent.type == "consumable" else Decimal(0)
        out.append({"feature_id": feature_id, "type": ent.type, "period": ent.period,
                    **answer(ent, total, Decimal(0), now)})
    return out


def check_db(session: Session, workspace_id: int, user_id: str, feature_id: str, delta: Decimal,
             now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """The check answered from PostgreSQL; also what it read, for the cache."""
    user = identity.find_user(session, workspace_id, user_id)
    if user is None:
        return answer(None, Decimal(0), delta, now, "unknown_user"), {}
    read: dict[str, Any] = {"ident": f"{user.kana_id}|{user.plan_id or ''}"}
    if user.plan_id is None:
        return answer(None, Decimal(0), delta, now, "no_plan"), read
    ents = plan_entitlements(session, workspace_id, user.plan_id)
    read["plan"] = (user.plan_id, ents)
    ent = ents.get(feature_id)
    if ent is None:
        return answer(None, Decimal(0), delta, now, "not_in_plan"), read
    if ent.type != "consumable":
        return answer(ent, Decimal(0), delta, now), read
    total = used(session, workspace_id, user.kana_id, feature_id, ent.period, now)
    read["used"] = (user.kana_id, f"{feature_id}|{period_key(ent.period, now)}", total)
    return answer(ent, total, delta, now), read


# --- Redis side ------------------------------------------------------------------


def _encode(ent: Entitlement) -> str:
    limit = "" if ent.limit is None else str(ent.limit)
    return f"{ent.period[0]}|{ent.type}|{limit}|{int(ent.overage)}"


def _decode(feature_id: str, value: str) -> Entitlement:
    period, kind, limit, overage = value.split("|")
    return Entitlement(feature_id, kind, Decimal(limit) if limit else None,
                       {"m": "month", "d": "day", "n": "none"}[period], overage == "1")


# One round trip for a warm check: generation, identity, plan entry and usage total.
_LOOKUP = """
local p = 'kana:ent:' .. ARGV[1]
local gen = redis.call('GET', p .. ':gen') or '0'
local g = p .. ':' .. gen
local ident = redis.call('GET', g .. ':id:' .. ARGV[2])
if not ident then return {gen} end
local sep = string.find(ident, '|', 1, true)
local plan = string.sub(ident, sep + 1)
if plan == '' then return {gen, ident} end
local pf = redis.call('HGET', g .. ':plan:' .. plan, ARGV[3])
if not pf then
  if redis.call('HEXISTS', g .. ':plan:' .. plan, '_') == 1 then return {gen, ident, ''} end
  return {gen, ident}
end
local key = 'all'
local period = string.sub(pf, 1, 1)
if period == 'm' then key = ARGV[4] elseif period == 'd' then key = ARGV[5] end
local used = redis.call('HGET', g .. ':used:' .. string.sub(ident, 1, sep - 1), ARGV[3] .. '|' .. key)
if not used then return {gen, ident, pf} end
return {gen, ident, pf, used}
"""


@lru_cache(maxsize=8)
def _lookup(redis: Redis) -> Script:
    # One Script per client: it hashes the source once and retries with EVAL after a Redis restart.
    return redis.register_script(_LOOKUP)


def check(redis: Redis, sessions: sessionmaker, workspace_id: int, user_id: str, feature_id: str,
          delta: Decimal = Decimal(1), now: datetime | None = None) -> dict[str, Any]:
    """canUseFeature: from Redis when warm (no database query); PostgreSQL on a miss, then refilled."""
    now = now or datetime.now(UTC)
    try:
        found = _lookup(redis)(args=[workspace_id, user_id, feature_id, period_key("month", now),
                                     period_key("day", now)])
    except RedisError as exc:
        # Checks keep answering, exactly, from PostgreSQL while Redis is away.
        log.warning("entitlement cache unreachable, answering from the database: %s", exc)
        found = [None]
    gen = counters.text(found[0]) if found[0] is not None else None
    if len(found) >= 3:
        if not found[2]:
            return answer(None, Decimal(0), delta, now, "not_in_plan")
        ent = _decode(feature_id, counters.text(found[2]))
        if ent.type != "consumable":
            return answer(ent, Decimal(0), delta, now)
        if len(found) == 4:
            return answer(ent, Decimal(counters.text(found[3])), delta, now)
    elif len(found) == 2 and counters.text(found[1]).endswith("|"):
        return answer(None, Decimal(0), delta, now, "no_plan")
    with read_only(sessions()) as session:
        body, read = check_db(session, workspace_id, user_id, feature_id, delta, now)
    if gen is not None:
        try:
            _refill(redis, workspace_id, gen, user_id, read)
        except RedisError as exc:
            log.warning("entitlement cache not refilled: %s", exc)
    return body


def _refill(redis: Redis, workspace_id: int, gen: str, user_id: str, read: dict[str, Any]) -> None:
    if not read:
        return  # unknown users are not cached: the event creating one would have to evict it
    base = counters.base(workspace_id, gen)
    pipe = redis.pipeline(transaction=False)
    pipe.set(f"{base}:id:{user_id}", read["ident"], ex=counters.TTL)
    if "plan" in read:
        plan_id, ents = read["plan"]
        key = f"{base}:plan:{plan_id}"
        pipe.hset(key, mapping={"_": "1", **{fid: _encode(ent) for fid, ent in ents.items()}})
        pipe.expire(key, counters.TTL)
    if "used" in read:
        kana_id, field, total = read["used"]
        key = f"{base}:used:{kana_id}"
        # Never over a worker's value: it was read after ours.
        pipe.hsetnx(key, field, str(total))
        pipe.expire(key, counters.TTL)
    pipe.execute()


# --- after a chunk: counters and alerts ------------------------------------------------


def idempotency_key(workspace_id: int, kana_id: int, feature_id: str, threshold: int, period_start: datetime) -> str:
    raw = f"{workspace_id}:{kana_id}:{feature_id}:{threshold}:{period_start.isoformat()}"
    return "thr_" + hashlib.sha256(raw.encode()).hexdigest()[:40]


def _insert_alerts(session: Session):  # noqa: ANN202 - a dialect-specific Insert
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite if dialect == "sqlite" else None
    if module is None:
        return insert(Alert)
    return module.insert(Alert).on_conflict_do_nothing(
        index_elements=["workspace_id", "kana_id", "feature_id", "threshold", "period_start"])


def after_usage(session: Session, workspace_id: int, pairs: Iterable[tuple[int, str]],
                now: datetime | None = None) -> int:
    """Within the transaction that recorded usage for ``pairs`` (kana_id, feature_id): read their
    current-period totals for the cache and record threshold crossings; returns alerts created.

    Only pairs whose user's plan has the feature matter: others have no limit to
    cross and their checks answer without a total.
    """
    pairs = set(pairs)
    if not pairs:
        return 0
    now = now or datetime.now(UTC)
    kana_ids = sorted({k for k, _ in pairs})
    feature_ids = sorted({f for _, f in pairs})
    # The plan features of the touched users, each with its current period's total, in one statement.
    used_now = totals.current(workspace_id, User.kana_id, PlanFeature.feature_id, PlanFeature.period,
                              ledger.floor(now, "day"), ledger.floor(now, "month"))
    rows = [r for r in session.execute(
        select(User.kana_id, User.user_id, PlanFeature, used_now.label("used"))
        .join(PlanFeature, and_(PlanFeature.workspace_id == User.workspace_id, PlanFeature.plan_id == User.plan_id))
        .where(User.workspace_id == workspace_id, User.kana_id.in_(kana_ids), PlanFeature.feature_id.in_(feature_ids))
    ).all() if (r.kana_id, r.PlanFeature.feature_id) in pairs]
    if not rows:
        return 0
    sums = {(r.kana_id, r.PlanFeature.feature_id): ledger.to_decimal(r.used) for r in rows}
    gen = counters.generation(workspace_id)
    if gen is not None:
        for row in rows:
            counters.add_total(session, workspace_id, gen, row.kana_id,
                               f"{row.PlanFeature.feature_id}|{period_key(row.PlanFeature.period, now)}",
                               str(sums[(row.kana_id, row.PlanFeature.feature_id)]))
    return _alerts(session, workspace_id, rows, sums, now)


def _alerts(session: Session, workspace_id: int, rows: list, sums: dict[tuple[int, str], Decimal],
            now: datetime) -> int:
    crossed = []
    for row in rows:
        pf: PlanFeature = row.PlanFeature
        if pf.limit is None or not pf.thresholds:
            continue
        total = sums[(row.kana_id, pf.feature_id)]
        start, end = period_bounds(pf.period, now)
        for threshold in pf.thresholds:
            if total * 100 >= pf.limit * threshold:
                crossed.append((row, threshold, start, end, total))
    if not crossed:
        return 0
    created = session.execute(
        _insert_alerts(session).returning(Alert.id, Alert.kana_id, Alert.feature_id, Alert.threshold),
        [{"workspace_id": workspace_id, "kana_id": row.kana_id, "feature_id": row.PlanFeature.feature_id,
          "threshold": threshold, "period_start": start or EPOCH, "created_at": now}
         for row, threshold, start, _end, _total in crossed],
    ).all()
    if not created:
        return 0
    ws = session.get(Workspace, workspace_id)
    new = {(k, f, t): alert_id for alert_id, k, f, t in created}
    for row, threshold, start, end, total in crossed:
        alert_id = new.get((row.kana_id, row.PlanFeature.feature_id, threshold))
        if alert_id is None or ws is None or not ws.webhook_url:
            continue
        key = idempotency_key(workspace_id, row.kana_id, row.PlanFeature.feature_id, threshold, start or EPOCH)
        payload = {
            "type": ALERT_TYPE,
            "id": key,
            "created_at": now.isoformat(),
            "data": {"kana_id": row.kana_id, "user_id": row.user_id, "feature_id": row.PlanFeature.feature_id,
                     "threshold": threshold, "used": number(total), "limit": number(row.PlanFeature.limit),
                     "period_start": start.isoformat() if start else None,
                     "period_end": end.isoformat() if end else None},
        }
        delivery = WebhookDelivery(workspace_id=workspace_id, alert_id=alert_id, type=ALERT_TYPE,
                                   idempotency_key=key, payload=payload, status="pending", attempts=0,
                                   next_attempt_at=now, created_at=now)
        session.add(delivery)
        session.flush()
        counters.add_delivery(session, delivery.id)
    return len(created)


