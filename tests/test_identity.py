"""SPEC §4: the identity matrix, merges, aliases and deletes, at the domain level."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from kana.domain import identity
from kana.domain.identity import Directory, Traits
from kana.models import Alias, Audit, Event, Usage, User

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def ws(workspace):
    return workspace.id


def ident(session, ws, user_id, at=None, **traits):
    return identity.identify(Directory(session, ws), user_id, Traits(**traits), at or T0)


def imported(session, ws, email, billing_id=None, name=None):
    return identity.create_user(session, ws, email=email, billing_id=billing_id, name=name,
                                billing_provider="stripe" if billing_id else None, source="stripe")


def users(session, ws):
    return list(session.scalars(select(User).where(User.workspace_id == ws).order_by(User.kana_id)))


def test_only_user_id_creates_then_updates(session, ws):
    a = ident(session, ws, "u1", name="Ann")
    assert (a.user_id, a.name, a.source) == ("u1", "Ann", "segment")
    again = ident(session, ws, "u1", name="Annie", at=T0 + timedelta(seconds=1))
    assert again.kana_id == a.kana_id and again.name == "Annie"
    assert len(users(session, ws)) == 1


def test_new_user_with_email_claims_single_unclaimed_user(session, ws):
    s = imported(session, ws, "Ann@Example.com", billing_id="cus_A1")
    a = ident(session, ws, "u1", email="ann@example.com", name="Ann")
    assert a.kana_id == s.kana_id
    assert (a.user_id, a.billing_id, a.source, a.name) == ("u1", "cus_A1", "stripe", "Ann")
    assert len(users(session, ws)) == 1


def test_new_user_with_email_and_no_unclaimed_match_creates_even_if_email_shared(session, ws):
    first = ident(session, ws, "u1", email="shared@example.com")
    second = ident(session, ws, "u2", email="shared@example.com")
    assert first.kana_id != second.kana_id
    assert {u.user_id for u in users(session, ws)} == {"u1", "u2"}


def test_new_user_with_several_unclaimed_matches_creates_and_merges_nothing(session, ws):
    imported(session, ws, "dup@example.com", billing_id="cus_1")
    imported(session, ws, "dup@example.com", billing_id="cus_2")
    a = ident(session, ws, "u1", email="dup@example.com")
    assert a.source == "segment" and a.billing_id is None
    assert len(users(session, ws)) == 3


def test_existing_user_with_email_merges_single_unclaimed_into_oldest(session, ws):
    s = imported(session, ws, "bob@example.com", billing_id="cus_B", name="Robert (Stripe)")
    a = ident(session, ws, "u1", name="Bob")  # no email yet: plain create
    assert a.kana_id != s.kana_id
    merged = ident(session, ws, "u1", email="bob@example.com", at=T0 + timedelta(seconds=1))
    # The Stripe import was created first: it survives, adopts the user_id, and
    # the triggering call's values win; for the rest the survivor keeps its own.
    assert merged.kana_id == s.kana_id
    assert (merged.user_id, merged.billing_id, merged.email) == ("u1", "cus_B", "bob@example.com")
    assert merged.name == "Robert (Stripe)"
    assert identity.find_user(session, ws, "u1").kana_id == s.kana_id
    assert [u.kana_id for u in users(session, ws)] == [s.kana_id]
    audit = session.scalars(select(Audit).where(Audit.workspace_id == ws, Audit.action == "merge")).one()
    assert audit.trigger == "identify" and sorted(audit.kana_ids) == sorted([s.kana_id, a.kana_id])


def test_existing_user_with_several_unclaimed_matches_merges_nothing(session, ws):
    imported(session, ws, "c@example.com", billing_id="cus_1")
    imported(session, ws, "c@example.com", billing_id="cus_2")
    a = ident(session, ws, "u1")
    a2 = ident(session, ws, "u1", email="c@example.com", at=T0 + timedelta(seconds=1))
    assert a2.kana_id == a.kana_id and a2.email == "c@example.com"
    assert len(users(session, ws)) == 3


def test_no_claim_when_billing_ids_conflict(session, ws):
    s = imported(session, ws, "d@example.com", billing_id="cus_D")
    a = ident(session, ws, "u1", email="d@example.com", billing_id="cus_OTHER")
    assert a.kana_id != s.kana_id and s.user_id is None
    assert a.billing_id == "cus_OTHER"


def test_no_merge_when_billing_ids_conflict(session, ws):
    s = imported(session, ws, "e@example.com", billing_id="cus_E")
    a = ident(session, ws, "u1", billing_id="cus_OTHER")
    after = ident(session, ws, "u1", email="e@example.com", at=T0 + timedelta(seconds=1))
    assert after.kana_id == a.kana_id and s.user_id is None
    assert len(users(session, ws)) == 2


def test_older_identify_does_not_overwrite_newer_traits(session, ws):
    ident(session, ws, "u1", name="New", at=T0 + timedelta(hours=1))
    old = ident(session, ws, "u1", name="Old", email="old@example.com", at=T0)
    assert old.name == "New"  # kept
    assert old.email == "old@example.com"  # a blank is still filled
    assert old.traits_at == T0 + timedelta(hours=1)


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
    session.flush()
    survivor = identity.merge(session, ws, [young, old], trigger="api", actor="test")
    assert survivor.kana_id == old.kana_id
    assert (survivor.name, survivor.email, survivor.billing_id) == ("Old name", "Y@example.com", "cus_Y")
    assert session.scalar(select(Event.kana_id).where(Event.id == ev.id)) == old.kana_id
    assert session.scalar(select(func.sum(Usage.delta)).where(Usage.kana_id == old.kana_id)) == 3
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
    assert u.kana_id not in {x.kana_id for x in users(session, ws)}


def test_gdpr_delete_removes_user_events_usage_aliases_and_pii(session, ws):
    d = Directory(session, ws)
    a, b = d.get_or_create("a"), d.get_or_create("b")
    identity.merge(session, ws, [a, b], trigger="api")
    ev = Event(workspace_id=ws, message_id="m", type="track", name="x", user_id="a", kana_id=a.kana_id,
               timestamp=T0, received_at=T0, properties={}, status="unmapped")
    session.add(ev)
    session.flush()
    assert identity.gdpr_delete(Directory(session, ws), "b") == 1
    assert users(session, ws) == []
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
