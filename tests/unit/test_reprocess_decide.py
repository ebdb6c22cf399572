"""Reprocessing's chunk decisions without a database: the same answers as ``usage.map_event`` on every event."""

from __future__ import annotations

import json
import random

from kana.domain import reprocess, usage
from kana.models import Feature
from tests.unit.test_rules import compiled

RULES = compiled(
    {"feature_id": "exports", "event": "Export", "delta_property": "rows",
     "conditions": [{"property": "format", "operator": "equals", "value": "csv"}]},
    {"feature_id": "seats", "event": "Seat", "type": "track",
     "conditions": [{"property": "plan.tier", "operator": "in", "value": ["pro", "team"]}]},
    {"feature_id": "exports", "event": "Export", "priority": 200},
    {"feature_id": "views", "event": "Viewed", "conditions": [{"property": "n", "operator": "gt", "value": 3}]},
)
FEATURES = {f: Feature(id=f) for f in ("exports", "seats", "views", "credits")}
NAMES = ("Export", "Seat", "Viewed", "Unknown", None)
PROPERTY_TEXTS = (
    "{}",
    "[]",
    '"a string"',
    '{"format": "csv", "rows": 7}',
    '{"format": "pdf"}',
    '{"format": "csv", "rows": "seven"}',
    '{"plan": {"tier": "pro"}}',
    '{"n": 5}',
    '{"featureId": "credits", "delta": 4}',
    '{"featureId": "ghost"}',
    '{"featureId": "credits", "delta": true}',
    '{"feature\\u0049d": "credits", "delta": 2}',  # the key spelt with an escape
    '{"label": "featureId is not a key here"}',
    '{"featureId": null, "format": "csv"}',
)


def reference(rows):
    """What the chunk would do with every event decoded and every rule tried (the pre-index behaviour)."""
    matched, reasons = [], []
    for event_id, kind, name, raw, reason in rows:
        props = json.loads(raw)
        try:
            mapping = usage.map_event(kind, props if isinstance(props, dict) else {}, FEATURES, RULES, name)
        except ValueError as exc:
            mapping = usage.Mapping(reason=f"invalid delta: {exc}"[:500])
        if mapping.feature_id is not None:
            matched.append((event_id, mapping.feature_id, mapping.delta))
        elif mapping.reason != reason:
            reasons.append((event_id, mapping.reason))
    return matched, reasons


def test_decisions_match_map_event_on_every_event():
    rnd = random.Random(7)
    rows = [(i, rnd.choice(("track", "page", "screen")), rnd.choice(NAMES), rnd.choice(PROPERTY_TEXTS),
             rnd.choice(("no rule matched", "unknown featureId 'credits'", None)))
            for i in range(3000)]
    got = reprocess._decide(rows, FEATURES, reprocess._by_name(RULES))
    assert got == reference(rows)
    assert got[0] and got[1]  # both kinds of outcome were exercised


def test_an_escaped_feature_id_is_decoded_even_without_a_rule_for_the_name():
    rows = [(1, "track", "Unknown", '{"feature\\u0049d": "credits", "delta": 2}', "unknown featureId 'credits'"),
            (2, "track", "Unknown", '{"other": "x"}', "no rule matched")]
    matched, reasons = reprocess._decide(rows, FEATURES, reprocess._by_name(RULES))
    assert [(m[0], m[1], str(m[2])) for m in matched] == [(1, "credits", "2")]
    assert reasons == []
