"""Entitlement periods on their own: calendar-UTC month, day and lifetime bounds."""

from __future__ import annotations

from datetime import UTC, datetime

from kana.domain import entitlements


def test_period_bounds_are_calendar_utc():
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert entitlements.period_bounds("month", now) == (datetime(2026, 12, 1, tzinfo=UTC),
                                                        datetime(2027, 1, 1, tzinfo=UTC))
    assert entitlements.period_bounds("day", now) == (datetime(2026, 12, 31, tzinfo=UTC),
                                                      datetime(2027, 1, 1, tzinfo=UTC))
    assert entitlements.period_bounds("none", now) == (None, None)


