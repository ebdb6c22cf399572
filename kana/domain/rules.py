"""No-code mapping rules: from calls without ``featureId`` to feature usage (SPEC §7).

A rule names a feature, an event name, optionally a call type (``track``,
``page`` or ``screen``; none means any of them), zero or more AND conditions
on properties, and optionally which property holds the amount.

Semantics, decided here once:

* Rules are tried in ``(priority, id)`` order; the **first** rule whose name,
  type and conditions all match wins. Lower priority runs first (default 100);
  among equal priorities the older rule wins.
* Properties are addressed by dot path (``plan.tier``, ``items.0.sku``). A
  top-level key that itself contains dots (``"plan.tier": ...``) is looked up
  literally first.
* Comparisons are strict about JSON types: ``"5"`` does not equal ``5``, and
  ``true`` is not the number ``1``. ``equals``/``not_equals``/``in`` compare
  JSON values; ``contains`` is substring (case-sensitive) on strings and
  membership on lists; ``gt``/``gte``/``lt``/``lte`` need a number on both
  sides (a non-number property simply does not match); ``exists`` (value
  ``true`` by default, ``false`` for "is absent") treats ``null`` as absent.
  A missing property never ``equals`` anything and always ``not_equals``.
* The amount is ``delta_property`` when the rule names one, otherwise
  ``properties.delta`` when present, otherwise 1 (Kana's documented default).
  When that property is missing or not a finite number the rule does **not**
  match (nothing is recorded with a made-up amount); later rules are still
  tried, and if none maps the event the unmapped reason names the rule and
  the property, so the operator can see why.
* Rules whose feature no longer exists, and disabled rules, are not applied.

``load_rules`` compiles a workspace's rules once (per processing chunk); the
matcher ``match`` is a pure function over the compiled rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from kana.errors import KanaError, NotFound, flatten
from kana.models import Feature, Rule, Workspace

OPERATORS = ("equals", "not_equals", "contains", "exists", "gt", "gte", "lt", "lte", "in")
NUMERIC_OPERATORS = ("gt", "gte", "lt", "lte")
CALL_TYPES = ("track", "page", "screen")
DEFAULT_PRIORITY = 100
MAX_CONDITIONS = 50
MAX_IN_VALUES = 1000
NO_RULE_MATCHED = "no rule matched"

# Dot-separated, non-empty segments; NUL can't be stored by PostgreSQL.
PATH = re.compile(r"[^.\x00]+(?:\.[^.\x00]+)*")
PATH_MESSAGE = "must be a property name or a dot path such as plan.tier (non-empty segments)"


# --- errors -------------------------------------------------------------------


class RuleError(KanaError, ValueError):
    """Invalid rule data; ``errors`` maps dotted field names (``conditions.0.value``) to messages."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("Invalid rule. " + "; ".join(f"{'body' if k == '_schema' else k}: {' '.join(v)}"
                                                      for k, v in errors.items()), errors)


class RuleNotFound(NotFound, LookupError):
    """No rule with this id in the workspace."""

    def __init__(self, rule_id: int) -> None:
        super().__init__(f"No rule {rule_id} in this workspace.")


# --- validation ----------------------------------------------------------------


def _is_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and (not isinstance(value, float) or math.isfinite(value))
    )


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | bool) or _is_number(value)


def _no_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, list):
        return all(_no_nul(v) for v in value)
    if isinstance(value, dict):
        return all(_no_nul(k) and _no_nul(v) for k, v in value.items())
    return True


def _path(value: str) -> bool:
    if not PATH.fullmatch(value):
        raise ValidationError(PATH_MESSAGE)
    return True


def _text(value: str) -> bool:
    if "\x00" in value:
        raise ValidationError("must not contain NUL characters")
    return True


class ConditionSchema(Schema):
    class Meta:
        unknown = RAISE

    property = fields.String(required=True, validate=[validate.Length(1, 500), _path])
    operator = fields.String(
        required=True, validate=validate.OneOf(OPERATORS, error="must be one of " + ", ".join(OPERATORS))
    )
    # The expected JSON type depends on the operator: checked below.
    value = fields.Raw(allow_none=True)

    @validates_schema
    def _value_fits_operator(self, data: dict, **kwargs: Any) -> None:
        op = data["operator"]
        present = "value" in data
        value = data.get("value")
        if not _no_nul(value):
            raise ValidationError("must not contain NUL characters", "value")
        if op in NUMERIC_OPERATORS:
            if not _is_number(value):
                raise ValidationError(f"{op} needs a finite number value, got {value!r}", "value")
        elif op == "in":
            if not isinstance(value, list) or not value:
                raise ValidationError("in needs a non-empty list of values", "value")
            if len(value) > MAX_IN_VALUES:
                raise ValidationError(f"in takes at most {MAX_IN_VALUES} values", "value")
            if not all(_is_scalar(v) for v in value):
                raise ValidationError("in takes strings, numbers, booleans or null", "value")
        elif op == "exists":
            if present and value is not None and not isinstance(value, bool):
                raise ValidationError("exists takes an optional boolean value (false: the property is absent)",
                                      "value")
        elif op == "contains":
            if not present or value is None or not _is_scalar(value):
                raise ValidationError("contains needs a string (substring) or a scalar (list membership)", "value")
        elif not present:  # equals, not_equals
            raise ValidationError(f"{op} needs a value (null is allowed)", "value")


class RuleSchema(Schema):
    """A rule as the API and the CLI accept it (unknown fields are errors)."""

    class Meta:
        unknown = RAISE

    feature_id = fields.String(required=True, validate=[validate.Length(1, 100), _text])
    event = fields.String(required=True, validate=[validate.Length(1, 1000), _text])
    type = fields.String(
        allow_none=True,
        load_default=None,
        validate=validate.OneOf(CALL_TYPES, error="must be one of " + ", ".join(CALL_TYPES) + " (or null: any)"),
    )
    conditions = fields.List(
        fields.Nested(ConditionSchema), load_default=list, validate=validate.Length(max=MAX_CONDITIONS)
    )
    delta_property = fields.String(allow_none=True, load_default=None, validate=[validate.Length(1, 500), _path])
    priority = fields.Integer(strict=True, load_default=DEFAULT_PRIORITY,
                              validate=validate.Range(-1_000_000, 1_000_000))
    enabled = fields.Boolean(load_default=True)


RULE_SCHEMA = RuleSchema()


def validate_rule(data: object, *, partial: bool = False) -> dict[str, Any]:
    """Validated rule fields; ``RuleError`` names each offending field."""
    if not isinstance(data, dict):
        raise RuleError({"_schema": ["the rule must be a JSON object"]})
    # A partial update may leave out rule fields, never a condition's: partial names the
    # top-level fields only (partial=True would reach into each condition too).
    try:
        return RULE_SCHEMA.load(data, partial=tuple(RULE_SCHEMA.fields) if partial else False)
    except ValidationError as exc:
        raise RuleError(flatten(exc.messages)) from exc


# --- persistence (callers own the transaction) ---------------------------------


def hold_mapping(session: Session, workspace_id: int, *, exclusive: bool = False) -> None:
    """Serialise "mapping with the current rules" against "changing the rules".

    Mapping transactions (a drain chunk, a reprocessing chunk) share-lock the
    workspace row; a rule or feature change takes it exclusively. So a change
    waits for every chunk that mapped with the old rules to commit, and the
    reprocessing job it enqueues afterwards sees those chunks' unmapped events;
    chunks that start later wait for the change and load the new rules.
    SQLite serialises writers (BEGIN IMMEDIATE), which gives the same order.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    # NO KEY UPDATE rather than UPDATE: inserts referencing the workspace
    # (FOR KEY SHARE) need not wait for a rule change.
    lock = {"key_share": True} if exclusive else {"read": True}
    session.execute(select(Workspace.id).where(Workspace.id == workspace_id).with_for_update(**lock))


def _check_feature(session: Session, workspace_id: int, feature_id: str) -> None:
    if session.get(Feature, (workspace_id, feature_id)) is None:
        raise RuleError({"feature_id": [f"unknown feature {feature_id!r}: create the feature first"]})


def list_rules(session: Session, workspace_id: int) -> list[Rule]:
    stmt = select(Rule).where(Rule.workspace_id == workspace_id).order_by(Rule.priority, Rule.id)
    return list(session.scalars(stmt))


def get_rule(session: Session, workspace_id: int, rule_id: int) -> Rule:
    rule = session.get(Rule, rule_id)
    if rule is None or rule.workspace_id != workspace_id:
        raise RuleNotFound(rule_id)
    return rule


def create_rule(session: Session, workspace_id: int, data: object) -> Rule:
    """Validate and add a rule (flushed, not committed). Reprocessing is the caller's next step."""
    fields_ = validate_rule(data)
    hold_mapping(session, workspace_id, exclusive=True)
    _check_feature(session, workspace_id, fields_["feature_id"])
    rule = Rule(workspace_id=workspace_id, **fields_)
    session.add(rule)
    session.flush()
    return rule


def update_rule(session: Session, workspace_id: int, rule_id: int, data: object) -> Rule:
    """Change the fields given (conditions are replaced as a whole)."""
    fields_ = validate_rule(data, partial=True)
    hold_mapping(session, workspace_id, exclusive=True)
    rule = get_rule(session, workspace_id, rule_id)
    if "feature_id" in fields_:
        _check_feature(session, workspace_id, fields_["feature_id"])
    for name, value in fields_.items():
        setattr(rule, name, value)
    session.flush()
    return rule


def delete_rule(session: Session, workspace_id: int, rule_id: int) -> None:
    """Remove a rule. Usage it already recorded stays: the ledger is history billing ran on."""
    hold_mapping(session, workspace_id, exclusive=True)
    session.delete(get_rule(session, workspace_id, rule_id))
    session.flush()


# --- compilation and matching ----------------------------------------------------


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
Getter = Callable[[dict], Any]
Test = Callable[[dict], bool]


def getter(path: str) -> Getter:
    """A function reading ``path`` (dots descend into objects, digits index lists) from properties."""
    parts = tuple(path.split("."))
    if len(parts) == 1:
        return lambda props: props.get(path, MISSING)

    def get(props: dict) -> Any:
        if path in props:  # a literal dotted key wins over descent
            return props[path]
        current: Any = props
        for part in parts:
            if isinstance(current, dict):
                current = current.get(part, MISSING)
                if current is MISSING:
                    return MISSING
            elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
                current = current[int(part)]
            else:
                return MISSING
        return current

    return get


def _key(value: Any) -> tuple[str, Any] | None:
    """A hashable, type-strict identity for JSON scalars (so True is not 1, "1" is not 1)."""
    if value is None:
        return ("z", None)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, str):
        return ("s", value)
    if _is_number(value):
        return ("n", value)
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is b
    if _is_number(a) and _is_number(b):
        return a == b
    return False


def compile_condition(prop: str, operator: str, value: Any = None) -> Test:
    """One condition as a predicate over an event's properties."""
    get = getter(prop)
    if operator == "equals":
        key = _key(value)
        if key is not None and value is not None:
            # Scalars (the common case): one hashable comparison per event.
            return lambda p: _key(get(p)) == key
        return lambda p: (v := get(p)) is not MISSING and _same(v, value)
    if operator == "not_equals":
        test = compile_condition(prop, "equals", value)
        return lambda p: not test(p)
    if operator == "exists":
        want = value is not False
        return lambda p: (get(p) not in (MISSING, None)) is want
    if operator in NUMERIC_OPERATORS:
        bound = value
        compare: Callable[[Any], bool] = {
            "gt": lambda v: v > bound,
            "gte": lambda v: v >= bound,
            "lt": lambda v: v < bound,
            "lte": lambda v: v <= bound,
        }[operator]
        return lambda p: _is_number(v := get(p)) and compare(v)
    if operator == "in":
        keys = frozenset(k for k in map(_key, value) if k is not None)
        return lambda p: _key(get(p)) in keys
    if operator == "contains":
        key = _key(value)

        def contains(p: dict) -> bool:
            v = get(p)
            if isinstance(v, str):
                return isinstance(value, str) and value in v
            if isinstance(v, list):
                return any(_key(item) == key for item in v)
            return False

        return contains
    raise ValueError(f"unknown operator {operator!r}")


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: int
    feature_id: str
    event: str
    type: str | None
    priority: int
    tests: tuple[Test, ...]
    delta: Getter
    delta_property: str
    # No delta_property: properties.delta when present, else 1.
    default_delta: bool


def compile_rule(rule: Rule) -> CompiledRule:
    return CompiledRule(
        id=rule.id,
        feature_id=rule.feature_id,
        event=rule.event,
        type=rule.type,
        priority=rule.priority,
        tests=tuple(compile_condition(c["property"], c["operator"], c.get("value")) for c in rule.conditions or ()),
        delta=getter(rule.delta_property or "delta"),
        delta_property=rule.delta_property or "delta",
        default_delta=rule.delta_property is None,
    )


def load_rules(session: Session, workspace_id: int) -> list[CompiledRule]:
    """The workspace's enabled rules whose feature exists, compiled, in (priority, id) order."""
    stmt = (
        select(Rule)
        .join(Feature, and_(Feature.workspace_id == Rule.workspace_id, Feature.id == Rule.feature_id))
        .where(Rule.workspace_id == workspace_id, Rule.enabled.is_(True))
        .order_by(Rule.priority, Rule.id)
    )
    return [compile_rule(r) for r in session.scalars(stmt)]


class Match(NamedTuple):
    """The outcome of the rules for one event: a feature and amount, or why not."""

    feature_id: str | None
    delta: Decimal | None
    rule_id: int | None
    reason: str | None = None


_ONE = Decimal(1)


def _amount(value: Any) -> Decimal | None:
    if not _is_number(value):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def match(rules: Sequence[CompiledRule] | Iterable[CompiledRule], call_type: str, name: str | None,
          properties: dict) -> Match | None:
    """The first rule (in the given order) matching the call, or None when none does.

    A rule whose conditions hold but whose amount property is missing or not a
    number does not match; if no later rule maps the event the result is a
    ``Match`` with no feature and a reason naming that rule.
    """
    near: Match | None = None
    for rule in rules:
        if rule.event != name or (rule.type is not None and rule.type != call_type):
            continue
        for test in rule.tests:
            if not test(properties):
                break
        else:
            raw = rule.delta(properties)
            if raw is MISSING and rule.default_delta:
                return Match(rule.feature_id, _ONE, rule.id)
            amount = _amount(raw)
            if amount is not None:
                return Match(rule.feature_id, amount, rule.id)
            if near is None:
                what = "missing" if raw is MISSING else "not a number"
                near = Match(None, None, rule.id,
                             f"rule {rule.id} matched but its amount property {rule.delta_property!r} is {what}")
    return near
