"""Dashboard rendering helpers on their own: chart scaling and the timeline's 30-minute sessions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kana.dashboard import charts, timeline
from kana.models import Event
from tests.fakes import fake_stripe, worker_settings  # noqa: F401 - fixtures

T0 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC)


def test_sessions_split_after_thirty_quiet_minutes():
    def ev(minutes: int) -> Event:
        return Event(timestamp=T0 + timedelta(minutes=minutes))

    events = [ev(m) for m in (200, 190, 161, 130, 100, 0)]  # newest first
    groups = timeline.sessions(events)
    sizes = [len(g.events) for g in groups]
    assert sizes == [3, 2, 1]  # 161→130 is 31 minutes: a new session; 130→100 is exactly 30: same session
    assert groups[0].start == T0 + timedelta(minutes=161) and groups[0].end == T0 + timedelta(minutes=200)
    assert timeline.sessions([]) == []


def test_chart_layout_scales_to_a_nice_maximum():
    chart = charts.bar_chart([("a", 0), ("b", 7), ("c", 3.5)], width=320, height=120)
    assert [t.label for t in chart.ticks] == ["0", "5", "10"]
    heights = [b.height for b in chart.bars]
    assert heights[0] == 0 and heights[1] == pytest.approx(2 * heights[2])
    assert not chart.empty and charts.bar_chart([("a", 0)]).empty
    negative = charts.bar_chart([("a", -2), ("b", 4)])
    assert negative.bars[0].y >= negative.bars[1].y + negative.bars[1].height - 0.01
    assert charts.nice_ceiling(0.3) == pytest.approx(0.5) and charts.nice_ceiling(101) == 200




def test_cookie_sessions_read_and_write_what_flask_does():
    from flask import Flask, session
    from flask.sessions import SecureCookieSessionInterface

    from kana.dashboard import CookieSessions

    def make(interface: SecureCookieSessionInterface) -> Flask:
        app = Flask("t")
        app.secret_key = "one"
        app.session_interface = interface

        @app.get("/set")
        def set_():
            session["who"] = "ada"
            return "ok"

        @app.get("/get")
        def get():
            return session.get("who", "-")

        return app

    ours, flasks = make(CookieSessions()), make(SecureCookieSessionInterface())
    # A cookie set by either is read by the other; no cookie, or a bad one, is an empty session.
    for writer, reader in ((ours, flasks), (flasks, ours)):
        client = writer.test_client()
        client.get("/set")
        cookie = client.get_cookie("session").value
        other = reader.test_client()
        other.set_cookie("session", cookie)
        assert other.get("/get").text == "ada"
    assert ours.test_client().get("/get").text == "-"
    bad = ours.test_client()
    bad.set_cookie("session", "forged")
    assert bad.get("/get").text == "-"
    # A new key (the old one a fallback) is used from the next request on.
    client = ours.test_client()
    client.get("/set")
    ours.secret_key, ours.config["SECRET_KEY_FALLBACKS"] = "two", ["one"]
    assert client.get("/get").text == "ada"
    client.get("/set")
    ours.config["SECRET_KEY_FALLBACKS"] = []
    assert client.get("/get").text == "ada"  # re-signed with "two" on the last write
