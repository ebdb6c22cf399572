"""The naive design the benchmark compares against: one RQ job and one commit per call."""

from __future__ import annotations

from kana.db import SessionLocal
from kana.ingest import processor


def apply_one(call: dict) -> None:
    processor.process(SessionLocal, [call])
