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




def test_a_drain_job_id_names_its_partitions():
    assert spool.partitions_of_job(spool.drain_job_id([3, 7, 12])) == [3, 7, 12]
    assert spool.partitions_of_job(spool.drain_job_id([5])) == [5]
    # A job queued before jobs took groups of partitions: drain-<p>-<uuid>.
    assert spool.partitions_of_job("drain-9-0f1e2d3c4b5a69788796a5b4c3d2e1f0") == [9]
    assert spool.partitions_of_job("webhook-17") == []
    assert spool.partitions_of_job("drain-x_1-abc") == []
