"""Reprocessing's read-ahead and parallel writers: errors surface in the caller and no thread is left behind."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select, text

from kana.db import SessionLocal
from kana.domain import reprocess, rules
from kana.models import Event, Usage
from tests.helpers import add_feature, count, post_batch, track, usage_total


def _stored(client, workspace, work, n: int) -> None:
    add_feature(workspace.id, "exports")
    post_batch(client, workspace, [track(f"u{i % 5}", "Export", {"rows": 1}) for i in range(n)])
    work()
    with SessionLocal.begin() as s:
        rules.create_rule(s, workspace.id, {"feature_id": "exports", "event": "Export", "delta_property": "rows"})


def _threads_left() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("reprocess-")]


@pytest.mark.parametrize("writers", [1, 2, 3])
def test_any_number_of_writers_maps_each_event_once(client, workspace, work, writers):
    _stored(client, workspace, work, 120)
    state = reprocess.reprocess(SessionLocal, workspace.id, chunk=7, writers=writers)
    assert (state.scanned, state.mapped, state.chunks) == (120, 120, 18)
    assert count(Usage, workspace.id) == 120 and usage_total(workspace.id, "exports") == 120
    assert reprocess.reprocess(SessionLocal, workspace.id, chunk=7, writers=writers).mapped == 0
    assert _threads_left() == []


def test_a_failing_write_is_raised_and_stops_the_reader(client, workspace, work, monkeypatch):
    _stored(client, workspace, work, 60)
    real = reprocess.apply_chunk
    calls = []

    def apply_chunk(session, workspace_id, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(session, workspace_id, rows)

    monkeypatch.setattr(reprocess, "apply_chunk", apply_chunk)
    with pytest.raises(RuntimeError, match="boom"):
        reprocess.reprocess(SessionLocal, workspace.id, chunk=5, writers=2)
    assert _threads_left() == []
    # What committed is whole chunks; a later run maps the rest exactly once.
    monkeypatch.setattr(reprocess, "apply_chunk", real)
    reprocess.reprocess(SessionLocal, workspace.id, chunk=5)
    assert count(Usage, workspace.id) == 60


def test_a_failing_read_is_raised_in_the_caller(client, workspace, work, monkeypatch):
    _stored(client, workspace, work, 30)
    real = reprocess.read_chunk
    calls = []

    def read_chunk(session, workspace_id, **kw):
        calls.append(kw)
        if len(calls) == 3:
            raise RuntimeError("read failed")
        return real(session, workspace_id, **kw)

    monkeypatch.setattr(reprocess, "read_chunk", read_chunk)
    with pytest.raises(RuntimeError, match="read failed"):
        reprocess.reprocess(SessionLocal, workspace.id, chunk=5)
    assert _threads_left() == []
    assert count(Usage, workspace.id) == 10  # the two chunks read before the failure


def test_stored_properties_are_decided_as_the_live_path_would(client, workspace, work):
    """Events whose name has no rule are decided from the stored text; a featureId spelt with an escape counts."""
    post_batch(client, workspace, [track("u1", "Spend", {"featureId": "credits", "delta": 3}),
                                   track("u1", "Other", {"note": "featureId"})])
    work()
    with SessionLocal.begin() as s:
        s.execute(text("UPDATE events SET properties = :p WHERE workspace_id = :ws AND name = 'Spend'"),
                  {"p": '{"feature\\u0049d": "credits", "delta": 3}', "ws": workspace.id})
    add_feature(workspace.id, "credits")
    state = reprocess.reprocess(SessionLocal, workspace.id)
    assert (state.scanned, state.mapped) == (2, 1)
    assert usage_total(workspace.id, "credits") == 3
    with SessionLocal() as s:
        left = s.execute(select(Event.name, Event.reason).where(Event.workspace_id == workspace.id,
                                                                Event.status == "unmapped")).all()
        assert s.scalar(select(func.count()).select_from(Usage).where(Usage.workspace_id == workspace.id)) == 1
    assert [tuple(r) for r in left] == [("Other", "no rule matched")]
