"""The naive design the benchmark compares against: one RQ job and one commit per call."""

from __future__ import annotations

from kana import processor
from kana.db import Session


def apply_one(call: dict) -> None:
    processor.process(Session, [call])
