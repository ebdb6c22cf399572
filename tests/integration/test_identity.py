"""SPEC §4: the identity matrix, merges, aliases and deletes, at the domain level.

The §4.1 matrix runs over both ways a user is identified, which go through the
same identity functions and must agree case by case:

* ``identify``: a Segment identify call applied by the processor (as a drain
  job applies it), userId and traits.email / name / billingUserId;
* ``csv``: a CSV import row with the user_id, email, name and billing_id columns.

Where the CSV legitimately differs it is said at the assertion: a user it
creates has source ``csv`` (not ``segment``), its merges are audited with
trigger ``csv``, and a row reports its status (created / updated / merged),
which the CSV case checks too. Rows have no timestamp: a later row always wins
(the out-of-order rule of §3 is identify's alone). Rows without a user_id
(email-only, kana_id) are CSV addressing, tested in test_csv.py.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from kana.domain import identity, totals
from kana.domain.identity import Directory, Traits
from kana.imports import csvfile
from kana.ingest import processor
from kana.models import Alias, Audit, Event, Usage, User
from tests.helpers import add_user, users_of

T0 = datetime(2026, 1, 1, tzinfo=UTC)
# What differs by path, by design (see the module docstring).
SOURCE = {"identify": "segment", "csv": "csv"}
TRIGGER = {"identify": "identify", "csv": "csv"}
# Trait name in an identify call, for each CSV column.
TRAIT = {"email": "email", "name": "name", "billing_id": "billingUserId"}


@pytest.fixture
def ws(workspace):
    return workspace.id


def ident(session, ws, user_id, at=None, **traits):
    return identity.identify(Directory(session, ws), user_id, Traits(**traits), at or T0)


def imported(session, ws, email, billing_id=None, name=None):
    """An unclaimed user, as a Stripe import makes it."""
    return add_user(session, ws, email=email, billing_id=billing_id, name=name, source="stripe")


# --- SPEC §4.1 over both paths ------------------------------------------------------------


@dataclass
class Sent:
    user: User
    status: str | None  # the CSV row's status; None for an identify


class Sender:
    """Identifies ``user_id`` with traits through one path: ``send(user_id, email=..., name=..., billing_id=...)``."""

    def __init__(self, path: str, session, ws: int) -> None:
        self.path, self.session, self.ws = path, session, ws
        self._clock = itertools.count(1)

    def __call__(self, user_id: str, **traits: str) -> Sent:
        return self._identify(user_id, traits) if self.path == "identify" else self._csv(user_id, traits)

    def _identify(self, user_id: str, traits: dict[str, str]) -> Sent:
        # Each call a second after the previous one: call order is time order, as rows are.
        at = (T0 + timedelta(seconds=next(self._clock))).isoformat()
        call = {"ws": self.ws, "type": "identify", "userId": user_id, "messageId": f"m-{uuid.uuid4().hex}",
                "traits": {TRAIT[k]: v for k, v in traits.items()}, "timestamp": at, "receivedAt": at}
        assert processor.apply(self.session, [call]).applied == 1
        return Sent(identity.find_user(self.session, self.ws, user_id), None)

    def _csv(self, user_id: str, traits: dict[str, str]) -> Sent:
        text = ",".join(["user_id", *traits]) + "\n" + ",".join([user_id, *traits.values()]) + "\n"
        parsed = csvfile.parse(text.encode())
        (row,) = csvfile.apply_rows(self.session, self.ws, None, parsed.rows(), actor="test").results
        assert row.status != "failed", row.errors
        return Sent(self.session.get(User, row.kana_id), row.status)

    def row(self, status: str) -> str | None:
        """The status a CSV row reports for this case (an identify reports none)."""
        return status if self.path == "csv" else None


@pytest.fixture(params=["identify", "csv"])
def send(request, session, ws) -> Sender:
    return Sender(request.param, session, ws)


def test_only_user_id_creates_then_updates(session, ws, send):
    # 2, no E → create U; then 1, A exists, no E → update A.
    a = send("u1", name="Ann")
    assert (a.user.user_id, a.user.name, a.user.source) == ("u1", "Ann", SOURCE[send.path])
    assert a.status == send.row("created")
    again = send("u1", name="Annie")
    assert again.user.kana_id == a.user.kana_id and again.user.name == "Annie"
    assert again.status == send.row("updated")
    assert len(users_of(session, ws)) == 1


def test_new_user_with_email_claims_single_unclaimed_user(session, ws, send):
    # 2, C has exactly one user S → S claims U (emails compared case-insensitively).
    s = imported(session, ws, "Ann@Example.com", billing_id="cus_A1")
    a = send("u1", email="ann@example.com", name="Ann")
    assert a.user.kana_id == s.kana_id and s.user_id == "u1"
    assert (a.user.user_id, a.user.billing_id, a.user.source, a.user.name) == ("u1", "cus_A1", "stripe", "Ann")
    assert a.status == send.row("updated")
    assert len(users_of(session, ws)) == 1


def test_new_user_with_email_and_no_unclaimed_match_creates_even_if_email_shared(session, ws, send):
    # 2, C empty → create U, although a user with a user_id shares E.
    first = send("u1", email="shared@example.com")
    second = send("u2", email="shared@example.com")
    assert first.user.kana_id != second.user.kana_id
    assert second.status == send.row("created")
    assert {u.user_id for u in users_of(session, ws)} == {"u1", "u2"}


def test_new_user_with_several_unclaimed_matches_creates_and_merges_nothing(session, ws, send):
    # 2, C has several → create U, merge nothing.
    imported(session, ws, "dup@example.com", billing_id="cus_1")
    imported(session, ws, "dup@example.com", billing_id="cus_2")
    a = send("u1", email="dup@example.com")
    assert a.user.source == SOURCE[send.path] and a.user.billing_id is None
    assert a.status == send.row("created")
    assert len(users_of(session, ws)) == 3


def test_existing_user_with_email_merges_single_unclaimed_into_oldest(session, ws, send):
    # 1, C has exactly one user S (created before A) → merge; S survives.
    s = imported(session, ws, "bob@example.com", billing_id="cus_B", name="Robert (Stripe)")
    a = send("u1", name="Bob").user  # no email yet: plain create
    assert a.kana_id != s.kana_id
    merged = send("u1", email="bob@example.com")
    # The Stripe import was created first: it survives, adopts the user_id, and
    # the triggering call's values win; for the rest the survivor keeps its own.
    assert merged.user.kana_id == s.kana_id and merged.status == send.row("merged")
    assert (merged.user.user_id, merged.user.billing_id, merged.user.email) == ("u1", "cus_B", "bob@example.com")
    assert merged.user.name == "Robert (Stripe)"
    assert identity.find_user(session, ws, "u1").kana_id == s.kana_id
    assert [u.kana_id for u in users_of(session, ws)] == [s.kana_id]
    audit = session.scalars(select(Audit).where(Audit.workspace_id == ws, Audit.action == "merge")).one()
    assert audit.trigger == TRIGGER[send.path] and sorted(audit.kana_ids) == sorted([s.kana_id, a.kana_id])


def test_existing_user_created_first_survives_the_merge(session, ws, send):
    # 1, C has exactly one user S (created after A) → merge; A survives, fills blanks from S.
    a = send("u1").user
    s = imported(session, ws, "ann@example.com", billing_id="cus_A")
    merged = send("u1", email="ann@example.com", name="Ann")
    assert merged.status == send.row("merged")
    (survivor,) = users_of(session, ws)
    assert survivor.kana_id == a.kana_id == merged.user.kana_id  # created first
    assert (survivor.user_id, survivor.billing_id, survivor.name) == ("u1", "cus_A", "Ann")
    assert s.kana_id not in {u.kana_id for u in users_of(session, ws)}


def test_existing_user_with_several_unclaimed_matches_merges_nothing(session, ws, send):
    # 1, C has several → update A, merge nothing.
    imported(session, ws, "c@example.com", billing_id="cus_1")
    imported(session, ws, "c@example.com", billing_id="cus_2")
    a = send("u1").user
    a2 = send("u1", email="c@example.com")
    assert a2.user.kana_id == a.kana_id and a2.user.email == "c@example.com"
    assert a2.status == send.row("updated")
    assert len(users_of(session, ws)) == 3


def test_existing_user_found_through_an_alias_is_updated_not_renamed(session, ws, send):
    # A is the user U is an alias of (§4.4): it is updated and keeps its user_id.
    b = add_user(session, ws, user_id="u2")
    session.add(Alias(workspace_id=ws, alias="old-u2", kana_id=b.kana_id))
    sent = send("old-u2", name="Bee")
    assert sent.user.kana_id == b.kana_id and (b.user_id, b.name) == ("u2", "Bee")
    assert sent.status == send.row("updated")
    assert len(users_of(session, ws)) == 1


def test_no_claim_when_billing_ids_conflict(session, ws, send):
    # 3, A doesn't exist: S's billing id differs from the call's → create U, S stays unclaimed.
    s = imported(session, ws, "d@example.com", billing_id="cus_D")
    a = send("u1", email="d@example.com", billing_id="cus_OTHER")
    assert a.user.kana_id != s.kana_id and s.user_id is None
    assert a.user.billing_id == "cus_OTHER" and a.status == send.row("created")


def test_no_merge_when_billing_ids_conflict(session, ws, send):
    # 3, A exists with another billing id than S → update A, merge nothing.
    s = imported(session, ws, "e@example.com", billing_id="cus_E")
    a = send("u1", billing_id="cus_OTHER").user
    after = send("u1", email="e@example.com")
    assert after.user.kana_id == a.kana_id and s.user_id is None
    assert after.status == send.row("updated")
    assert len(users_of(session, ws)) == 2


def test_the_same_billing_id_or_one_missing_is_no_conflict(session, ws, send):
    # 3 needs both billing ids set and different: the same id claims, a blank one merges.
    s = imported(session, ws, "f@example.com", billing_id="cus_F")
    claimed = send("u1", email="f@example.com", billing_id="cus_F")
    assert claimed.user.kana_id == s.kana_id and claimed.status == send.row("updated")
    g = imported(session, ws, "g@example.com")
    a = send("u2", billing_id="cus_G").user
    merged = send("u2", email="g@example.com")
    assert merged.status == send.row("merged")
    assert {u.kana_id for u in users_of(session, ws)} == {s.kana_id, g.kana_id}  # g created first: it survives
    assert (merged.user.kana_id, merged.user.user_id, merged.user.billing_id) == (g.kana_id, "u2", "cus_G")
    assert a.kana_id != g.kana_id


# --- identify only ---------------------------------------------------------------------------


def test_older_identify_does_not_overwrite_newer_traits(session, ws):
    # SPEC §3: Segment doesn't guarantee order. A CSV row has no timestamp (a later row wins).
    ident(session, ws, "u1", name="New", at=T0 + timedelta(hours=1))
    old = ident(session, ws, "u1", name="Old", email="old@example.com", at=T0)
    assert old.name == "New"  # kept
    assert old.email == "old@example.com"  # a blank is still filled
    assert old.traits_at == T0 + timedelta(hours=1)


# --- merges, aliases, deletes ------------------------------------------------------------------


def test_merge_survivor_is_oldest_fills_blanks_and_moves_rows(session, ws):
    d = Directory(session, ws)
    old = d.get_or_create("old")
    young = d.get_or_create("young")
    young.email, young.email_key, young.billing_id = "Y@example.com", "y@example.com", "cus_Y"
    old.name = "Old name"
    young.name = "Young name"
    session.flush()
    ev = Event(workspace_id=ws, message_id="m1", type="track", name="x", user_id="young", kana_id=young.kana_id,
               timestamp=T0, received_at=T0, properties={}, status="mapped", feature_id="f")
    session.add(ev)
    session.flush()
    session.add(Usage(workspace_id=ws, kana_id=young.kana_id, feature_id="f", delta=Decimal(3), at=T0, event_id=ev.id))
    totals.add(session, ws, [(young.kana_id, "f", T0, Decimal(3))])
    session.flush()
    survivor = identity.merge(session, ws, [young, old], trigger="api", actor="test")
    assert survivor.kana_id == old.kana_id
    assert (survivor.name, survivor.email, survivor.billing_id) == ("Old name", "Y@example.com", "cus_Y")
    assert session.scalar(select(Event.kana_id).where(Event.id == ev.id)) == old.kana_id
    assert session.scalar(select(func.sum(Usage.delta)).where(Usage.kana_id == old.kana_id)) == 3
    assert totals.total(session, ws, old.kana_id, "f", "none", None) == 3  # the totals moved too
    assert totals.total(session, ws, young.kana_id, "f", "none", None) == 0
    assert identity.aliases_of(session, ws, old.kana_id) == ["young"]
    assert identity.find_user(session, ws, "young").kana_id == old.kana_id


def test_merge_needs_two_users_of_the_workspace(session, ws, new_workspace):
    other = new_workspace("other")
    a = identity.create_user(session, ws, user_id="a")
    b = identity.create_user(session, other.id, user_id="b")
    with pytest.raises(ValueError):
        identity.merge(session, ws, [a], trigger="api")
    with pytest.raises(ValueError):
        identity.merge(session, ws, [a, b], trigger="api")


def test_merge_chain_keeps_every_alias_resolving(session, ws):
    d = Directory(session, ws)
    a, b, c = (d.get_or_create(x) for x in ("a", "b", "c"))
    s1 = identity.merge(session, ws, [b, c], trigger="api")
    s2 = identity.merge(session, ws, [s1, a], trigger="api")
    assert s2.user_id == "a"
    for uid in ("a", "b", "c"):
        assert identity.find_user(session, ws, uid).kana_id == s2.kana_id


def test_alias_renames_when_only_previous_exists(session, ws):
    d = Directory(session, ws)
    anon = d.get_or_create("anon-1")
    user = identity.alias(d, "anon-1", "u1")
    assert user.kana_id == anon.kana_id and user.user_id == "u1"
    assert identity.find_user(session, ws, "anon-1").kana_id == anon.kana_id


def test_alias_merges_when_both_exist_and_is_noop_otherwise(session, ws):
    d = Directory(session, ws)
    p = d.get_or_create("p")
    u = d.get_or_create("u")
    merged = identity.alias(d, "p", "u")
    assert merged.kana_id == p.kana_id  # oldest survives, under the call's userId
    assert merged.user_id == "u" and identity.aliases_of(session, ws, p.kana_id) == ["p"]
    assert identity.find_user(session, ws, "u").kana_id == p.kana_id
    assert identity.alias(Directory(session, ws), "nobody", "nobody-else") is None
    results = [a.detail["result"] for a in session.scalars(
        select(Audit).where(Audit.workspace_id == ws, Audit.action == "alias").order_by(Audit.id))]
    assert results == ["merged", "noop"]
    assert u.kana_id not in {x.kana_id for x in users_of(session, ws)}


def test_gdpr_delete_removes_user_events_usage_aliases_and_pii(session, ws):
    d = Directory(session, ws)
    a, b = d.get_or_create("a"), d.get_or_create("b")
    identity.merge(session, ws, [a, b], trigger="api")
    ev = Event(workspace_id=ws, message_id="m", type="track", name="x", user_id="a", kana_id=a.kana_id,
               timestamp=T0, received_at=T0, properties={}, status="unmapped")
    session.add(ev)
    session.flush()
    assert identity.gdpr_delete(Directory(session, ws), "b") == 1
    assert users_of(session, ws) == []
    assert session.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws)) == 0
    assert session.scalar(select(func.count()).select_from(Alias).where(Alias.workspace_id == ws)) == 0
    for row in session.scalars(select(Audit).where(Audit.workspace_id == ws)):
        assert "a" not in str(row.detail).replace("redacted", "") or row.action == "gdpr_delete"
        assert "'b'" not in str(row.detail)


def test_create_user_rejects_taken_ids_including_aliases(session, ws):
    d = Directory(session, ws)
    a, b = d.get_or_create("a"), d.get_or_create("b")
    identity.merge(session, ws, [a, b], trigger="api")
    with pytest.raises(identity.Conflict):
        identity.create_user(session, ws, user_id="a")
    with pytest.raises(identity.Conflict):
        identity.create_user(session, ws, user_id="b")
    assert identity.create_user(session, ws, email="x@example.com").user_id is None
