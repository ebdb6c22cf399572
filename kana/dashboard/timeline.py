"""A user's event timeline grouped into sessions, the way Kustomer groups a customer's timeline:
events belong to one session until 30 minutes pass without any."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kana.dashboard.common import bp
from kana.models import Event

SESSION_GAP = timedelta(minutes=30)


@dataclass
class TimelineSession:
    events: list[Event] = field(default_factory=list)  # newest first

    @property
    def start(self) -> datetime:
        return self.events[-1].timestamp

    @property
    def end(self) -> datetime:
        return self.events[0].timestamp

    @property
    def duration(self) -> timedelta:
        return self.end - self.start


def sessions(events: Iterable[Event], gap: timedelta = SESSION_GAP) -> list[TimelineSession]:
    """Group events given newest first into sessions, newest session first.

    A new session starts where the time between two consecutive events is
    more than ``gap``.
    """
    out: list[TimelineSession] = []
    previous: datetime | None = None
    for event in events:
        if previous is None or previous - event.timestamp > gap:
            out.append(TimelineSession())
        out[-1].events.append(event)
        previous = event.timestamp
    return out


@bp.app_template_filter("event_details")
def event_details(event: Event) -> dict[str, Any]:
    """What Segment sent about an event beyond its properties: the kept context and the four timestamps."""
    stamps = event.timestamps or {}
    return {
        "context": event.context or {},
        "timestamp": event.timestamp.isoformat(),
        "originalTimestamp": stamps.get("originalTimestamp"),
        "sentAt": stamps.get("sentAt"),
        "receivedAt": stamps.get("receivedAt"),
        "receivedAt (by Kana)": event.received_at.isoformat(),
    }
