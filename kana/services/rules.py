"""Mapping rules (SPEC §7): saving one commits, then queues the reprocessing of stored unmapped events."""

from __future__ import annotations

import json
import logging
from typing import Any

from redis.exceptions import RedisError

from kana.db import SessionLocal
from kana.domain import ids, reprocess, rules
from kana.errors import Unavailable
from kana.runtime import Runtime
from kana.serializers import rule_json

log = logging.getLogger(__name__)

NOT_QUEUED = "The queue (Redis) is unreachable: the change is saved, but reprocessing was not queued."


def request_reprocess(rt: Runtime, workspace_id: int, why: str = "requested") -> str:
    """Queue a reprocessing pass of the workspace's stored unmapped events; its job id."""
    try:
        return reprocess.enqueue(rt.queue, workspace_id, why=why)
    except RedisError as exc:
        raise Unavailable() from exc


def reprocess_after(rt: Runtime, workspace_id: int, why: str) -> dict[str, Any]:
    """``{"job_id"}`` of the reprocessing that follows a committed change.

    Redis being down does not turn the saved change into an error: ``job_id``
    is None and ``reprocess_error`` says reprocessing was not queued.
    """
    try:
        return {"job_id": request_reprocess(rt, workspace_id, why)}
    except Unavailable:
        log.warning("%s, but reprocessing could not be queued", why)
        return {"job_id": None, "reprocess_error": NOT_QUEUED}


def _check_id(rule_id: int) -> None:
    if not ids.in_id_range(rule_id):
        raise rules.RuleNotFound(rule_id)


def get(workspace_id: int, rule_id: int) -> dict[str, Any]:
    _check_id(rule_id)
    with SessionLocal.begin() as s:
        return rule_json(rules.get_rule(s, workspace_id, rule_id))


def listed(workspace_id: int) -> list[dict[str, Any]]:
    with SessionLocal.begin() as s:
        return [rule_json(r) for r in rules.list_rules(s, workspace_id)]


def create(rt: Runtime | None, workspace_id: int, data: Any) -> dict[str, Any]:
    """Save a rule; with a runtime, then queue reprocessing (``job_id``); without, the caller reprocesses."""
    with SessionLocal.begin() as s:
        body = rule_json(rules.create_rule(s, workspace_id, data))
    if rt is not None:
        body.update(reprocess_after(rt, workspace_id, f"rule {body['id']} created"))
    return body


def update(rt: Runtime, workspace_id: int, rule_id: int, data: Any) -> dict[str, Any]:
    _check_id(rule_id)
    with SessionLocal.begin() as s:
        body = rule_json(rules.update_rule(s, workspace_id, rule_id, data))
    body.update(reprocess_after(rt, workspace_id, f"rule {rule_id} changed"))
    return body


def delete(workspace_id: int, rule_id: int) -> None:
    """Delete a rule; the usage it already recorded stays in the ledger (no reprocessing)."""
    _check_id(rule_id)
    with SessionLocal.begin() as s:
        rules.delete_rule(s, workspace_id, rule_id)


def typed_value(raw: str) -> object:
    """A condition value as a person types it (form field, command line): JSON when it parses
    (5, true, ["a","b"]), else the text itself."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw
