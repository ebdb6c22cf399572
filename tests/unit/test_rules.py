"""Mapping rules (SPEC §7) without a database: every operator, AND conditions, priority, amounts, reasons."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kana.domain import rules, usage
from kana.models import Feature, Rule


def compiled(*specs: dict) -> list[rules.CompiledRule]:
    """Rules compiled without a database (ids in the given order)."""
    out = []
    for i, spec in enumerate(specs, start=1):
        spec = dict(spec)
        rule_id = spec.pop("id", i)
        out.append(rules.compile_rule(Rule(id=rule_id, **rules.validate_rule(spec))))
    return sorted(out, key=lambda r: (r.priority, r.id))


PROPS = {
    "plan": {"tier": "pro", "seats": 12, "annual": True, "addons": ["sso", "audit"]},
    "channel": {"kind": "email"},
    "amount": 2.5,
    "count": 0,
    "label": "Quarterly Report",
    "tags": ["a", 1, True],
    "nothing": None,
    "items": [{"sku": "X1"}, {"sku": "Y2"}],
    "dotted.key": "literal",
}


OPERATOR_CASES = [
    # equals: strict JSON types
    ("plan.tier", "equals", "pro", True),
    ("plan.tier", "equals", "Pro", False),
    ("plan.seats", "equals", 12, True),
    ("plan.seats", "equals", 12.0, True),
    ("plan.seats", "equals", "12", False),
    ("plan.annual", "equals", True, True),
    ("plan.annual", "equals", 1, False),
    ("count", "equals", False, False),
    ("nothing", "equals", None, True),
    ("missing", "equals", None, False),
    ("plan.addons", "equals", ["sso", "audit"], True),
    ("channel", "equals", {"kind": "email"}, True),
    # not_equals: a missing property is "not equal"
    ("plan.tier", "not_equals", "free", True),
    ("plan.tier", "not_equals", "pro", False),
    ("missing.path", "not_equals", "pro", True),
    # contains: substring on strings, membership on lists
    ("label", "contains", "Report", True),
    ("label", "contains", "report", False),
    ("plan.addons", "contains", "sso", True),
    ("plan.addons", "contains", "saml", False),
    ("tags", "contains", 1, True),
    ("tags", "contains", True, True),
    ("plan.seats", "contains", "1", False),
    # exists (null counts as absent)
    ("channel.kind", "exists", True, True),
    ("channel.kind", "exists", None, True),
    ("channel.name", "exists", True, False),
    ("channel.name", "exists", False, True),
    ("nothing", "exists", True, False),
    ("nothing", "exists", False, True),
    # numeric comparisons need numbers on both sides
    ("plan.seats", "gt", 10, True),
    ("plan.seats", "gt", 12, False),
    ("plan.seats", "gte", 12, True),
    ("amount", "lt", 3, True),
    ("amount", "lt", 2.5, False),
    ("amount", "lte", 2.5, True),
    ("plan.tier", "gt", 0, False),
    ("plan.annual", "gte", 0, False),
    ("missing", "lt", 100, False),
    # in: strict membership among scalars
    ("channel.kind", "in", ["sms", "email"], True),
    ("channel.kind", "in", ["sms", "push"], False),
    ("plan.seats", "in", [10, 12], True),
    ("plan.seats", "in", ["12"], False),
    ("plan.annual", "in", [1], False),
    ("missing", "in", [None], False),
    # paths: list indexes, literal dotted keys
    ("items.1.sku", "equals", "Y2", True),
    ("items.5.sku", "exists", True, False),
    ("dotted.key", "equals", "literal", True),
]


@pytest.mark.parametrize(("prop", "op", "value", "expected"), OPERATOR_CASES)
def test_every_operator(prop, op, value, expected):
    condition = {"property": prop, "operator": op}
    if value is not None or op != "exists":
        condition["value"] = value
    rules.validate_rule({"feature_id": "f", "event": "E", "conditions": [condition]})  # valid as written
    assert rules.compile_condition(prop, op, value)(PROPS) is expected


def test_all_conditions_must_hold_and_nested_paths():
    ruleset = compiled({"feature_id": "pro-emails", "event": "Message Sent", "conditions": [
        {"property": "plan.tier", "operator": "equals", "value": "pro"},
        {"property": "channel.kind", "operator": "in", "value": ["email", "sms"]},
        {"property": "plan.seats", "operator": "gte", "value": 10},
    ]})
    assert rules.match(ruleset, "track", "Message Sent", PROPS).feature_id == "pro-emails"
    assert rules.match(ruleset, "track", "Message Sent", {**PROPS, "channel": {"kind": "push"}}) is None
    assert rules.match(ruleset, "track", "Message Sent", {"plan": {"tier": "pro"}}) is None
    assert rules.match(ruleset, "track", "Other Event", PROPS) is None


def test_first_match_wins_by_priority_then_age():
    ruleset = compiled(
        {"id": 1, "feature_id": "generic", "event": "Export", "priority": 100},
        {"id": 2, "feature_id": "csv", "event": "Export", "priority": 10,
         "conditions": [{"property": "format", "operator": "equals", "value": "csv"}]},
        {"id": 3, "feature_id": "also-generic", "event": "Export", "priority": 100},
    )
    assert [r.id for r in ruleset] == [2, 1, 3]
    assert rules.match(ruleset, "track", "Export", {"format": "csv"}).feature_id == "csv"
    # rule 2 does not hold: of the two equal-priority rules the older (lower id) wins
    assert rules.match(ruleset, "track", "Export", {"format": "pdf"}) == ("generic", Decimal(1), 1, None)


def test_call_type_and_amounts():
    ruleset = compiled(
        {"feature_id": "pricing-views", "event": "Pricing", "type": "page"},
        {"feature_id": "app-screens", "event": "Pricing", "type": "screen"},
        {"feature_id": "credits", "event": "Credits Used", "delta_property": "usage.credits"},
        {"feature_id": "messages", "event": "Sent"},
    )
    assert rules.match(ruleset, "page", "Pricing", {}).feature_id == "pricing-views"
    assert rules.match(ruleset, "screen", "Pricing", {}).feature_id == "app-screens"
    assert rules.match(ruleset, "track", "Pricing", {}) is None
    assert rules.match(ruleset, "track", "Credits Used", {"usage": {"credits": 7.5}}).delta == Decimal("7.5")
    # no delta_property: properties.delta if present, else 1
    assert rules.match(ruleset, "track", "Sent", {"delta": 3}).delta == 3
    assert rules.match(ruleset, "page", "Sent", {}).delta == 1
    # an unusable amount makes the rule not match, and says why
    for props, what in (({}, "missing"), ({"usage": {"credits": "7"}}, "not a number"),
                        ({"usage": {"credits": True}}, "not a number")):
        miss = rules.match(ruleset, "track", "Credits Used", props)
        assert miss.feature_id is None and what in miss.reason and "usage.credits" in miss.reason


def test_amount_fallthrough_to_a_later_rule():
    ruleset = compiled(
        {"feature_id": "credits", "event": "Used", "priority": 1, "delta_property": "credits"},
        {"feature_id": "uses", "event": "Used", "priority": 2},
    )
    assert rules.match(ruleset, "track", "Used", {"credits": 4}).feature_id == "credits"
    assert rules.match(ruleset, "track", "Used", {}).feature_id == "uses"


def test_map_event_prefers_feature_id_and_reports_reasons():
    features = {"messages": Feature(id="messages"), "exports": Feature(id="exports")}
    ruleset = compiled({"feature_id": "exports", "event": "Export"})
    assert usage.map_event("track", {"featureId": "messages"}, features, ruleset, "Export").feature_id == "messages"
    assert usage.map_event("track", {"featureId": "nope"}, features, ruleset, "Export").reason == \
        "unknown featureId 'nope'"
    assert usage.map_event("track", {}, features, ruleset, "Export").feature_id == "exports"
    assert usage.map_event("track", {}, features, ruleset, "Import").reason == "no rule matched"


