"""Partitioning on its own: one user always lands in one partition; users and workspaces spread."""

from __future__ import annotations

from kana.ingest import spool


def test_one_user_always_lands_in_one_partition():
    parts = {spool.partition_of(1, "user-1", 16) for _ in range(10)}
    assert len(parts) == 1
    # The workspace is part of the key: one userId of many workspaces spreads over partitions.
    assert len({spool.partition_of(ws, "user-1", 16) for ws in range(1, 50)}) > 1
    spread = {spool.partition_of(1, f"user-{i}", 16) for i in range(200)}
    assert len(spread) == 16


