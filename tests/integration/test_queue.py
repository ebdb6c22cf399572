"""The Redis side of processing: partitions, drain locks, inflight recovery, wake-ups."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from jobs import maintenance
from kana.db import SessionLocal
from kana.ingest import processor, spool
from kana.models import Event, Feature, Usage

NOW = "2026-11-23T00:00:00+00:00"


def call(ws: int, i: int, user: str = "u1") -> dict:
    return {"ws": ws, "type": "track", "messageId": f"m{i}", "userId": user, "event": "E",
            "properties": {"featureId": "f"}, "timestamp": NOW, "receivedAt": NOW}


@pytest.fixture
def ws(workspace):
    with SessionLocal.begin() as s:
        s.add(Feature(workspace_id=workspace.id, id="f", name="F", type="consumable"))
    return workspace.id


def stored(ws: int) -> int:
    with SessionLocal() as s:
        return s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws))


def test_drain_applies_in_order_and_acknowledges(redis, ws):
    seen: list[str] = []
    spool.push(redis, [call(ws, i) for i in range(25)], 4)
    p = spool.partition_of(ws, "u1", 4)
    result = spool.drain(redis, p, lambda evs: seen.extend(e["messageId"] for e in evs), batch_size=10, lock_ttl=5)
    assert seen == [f"m{i}" for i in range(25)]
    assert (result.chunks, result.events) == (3, 25)
    assert redis.llen(spool.queue_key(p)) == redis.llen(spool.inflight_key(p)) == 0
    assert not redis.exists(spool.lock_key(p)) and not redis.exists(spool.wake_key(p))
    assert spool.workspace_counters(redis, ws) == {"received": 25, "pending": 0}


def test_chunk_of_a_failed_drain_stays_inflight_and_is_applied_first(redis, ws):
    spool.push(redis, [call(ws, i) for i in range(10)], 4)
    p = spool.partition_of(ws, "u1", 4)

    def boom(events):
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        spool.drain(redis, p, boom, batch_size=4, lock_ttl=5)
    assert redis.llen(spool.inflight_key(p)) == 4 and redis.llen(spool.queue_key(p)) == 6
    spool.push(redis, [call(ws, 10)], 4)
    seen: list[str] = []
    spool.drain(redis, p, lambda evs: seen.extend(e["messageId"] for e in evs), batch_size=4, lock_ttl=5)
    assert seen == [f"m{i}" for i in range(11)]


def test_commit_then_crash_before_ack_is_not_doubled(redis, ws):
    """The chunk committed but the worker died before trimming it: re-applying is a no-op."""
    spool.push(redis, [call(ws, i) for i in range(6)], 4)
    p = spool.partition_of(ws, "u1", 4)

    def commit_then_die(events):
        processor.process(SessionLocal, events)
        raise SystemExit("killed after commit")

    with pytest.raises(SystemExit):
        spool.drain(redis, p, commit_then_die, batch_size=6, lock_ttl=5)
    spool.drain(redis, p, lambda evs: processor.process(SessionLocal, evs), batch_size=6, lock_ttl=5)
    assert stored(ws) == 6
    with SessionLocal() as s:
        assert s.scalar(select(func.sum(Usage.delta)).where(Usage.workspace_id == ws)) == 6


def test_holder_that_lost_its_lock_leaves_the_chunk_to_the_next(redis, ws):
    spool.push(redis, [call(ws, i) for i in range(3)], 4)
    p = spool.partition_of(ws, "u1", 4)

    def stall(events):
        redis.delete(spool.lock_key(p))  # as if the TTL ran out mid-chunk
        redis.set(spool.lock_key(p), "someone-else", px=200)

    with pytest.raises(spool.LockLost):
        spool.drain(redis, p, stall, batch_size=3, lock_ttl=5)
    assert redis.llen(spool.inflight_key(p)) == 3


def test_database_outage_keeps_the_chunk_queued(redis, ws):
    spool.push(redis, [call(ws, i) for i in range(5)], 4)
    p = spool.partition_of(ws, "u1", 4)
    down = sessionmaker(bind=create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none",
                                           connect_args={"connect_timeout": 1}))
    with pytest.raises(OperationalError):
        spool.drain(redis, p, lambda evs: processor.process(down, evs), batch_size=5, lock_ttl=5)
    assert redis.llen(spool.inflight_key(p)) == 5
    assert stored(ws) == 0
    spool.drain(redis, p, lambda evs: processor.process(SessionLocal, evs), batch_size=5, lock_ttl=5)
    assert stored(ws) == 5


def test_no_wakeup_is_lost_while_pushes_race_the_drain(redis, ws, runtime, work):
    """Producers push while drains run and finish; every call is applied in the end."""
    parts = runtime.settings.partitions
    stop = threading.Event()
    pushed = []

    def produce():
        i = 0
        while not stop.is_set() and i < 1500:
            batch = [call(ws, 100_000 + i + k, user=f"u{(i + k) % 7}") for k in range(5)]
            runtime.enqueue_drains(spool.push(redis, batch, parts))
            pushed.extend(batch)
            i += 5

    thread = threading.Thread(target=produce)
    thread.start()
    for _ in range(5):
        work()
    thread.join()
    stop.set()
    work()
    assert stored(ws) == len(pushed)


def test_push_raises_each_wake_flag_once(redis, ws):
    """Only the push that raised a partition's flag asks for a drain job."""
    first = spool.push(redis, [call(ws, i, user=f"w{i}") for i in range(12)], 4)
    assert sorted(first) == sorted({spool.partition_of(ws, f"w{i}", 4) for i in range(12)})
    assert all(redis.exists(spool.wake_key(p)) for p in first)
    assert spool.push(redis, [call(ws, 100 + i, user=f"w{i}") for i in range(12)], 4) == []
    redis.delete(spool.wake_key(first[0]))  # a drain found the queue empty and cleared it
    assert spool.push(redis, [call(ws, 200, user="w0"), call(ws, 201, user="w1")], 4) == (
        [first[0]] if first[0] in {spool.partition_of(ws, "w0", 4), spool.partition_of(ws, "w1", 4)} else [])
    assert spool.push(redis, [], 4) == []


def test_recover_wakes_stranded_partitions_only(redis, ws, runtime, work):
    parts = runtime.settings.partitions
    touched = set(spool.push(redis, [call(ws, i, user=f"s{i}") for i in range(20)], parts))
    # Pushed without a wake-up (as if the enqueue after the push failed).
    assert len(runtime.queue) == 0
    locked = next(iter(touched))
    redis.set(spool.lock_key(locked), "live-holder", px=60_000)
    woken = maintenance.recover()["woken"]
    assert sorted(woken) == sorted(touched - {locked})
    redis.delete(spool.lock_key(locked))
    maintenance.recover()
    work()
    assert stored(ws) == 20




def test_a_push_waking_many_partitions_queues_a_job_per_group(redis, ws, runtime):
    """Each raised flag is covered by exactly one job, groups spread over several jobs."""
    from kana import broker

    settings = dataclasses.replace(runtime.settings, drain_group=4)
    woken = list(range(10))
    assert broker.enqueue_drains(redis, settings, woken) == 3
    named = [spool.partitions_of_job(j) for j in broker.job_queue(redis, settings).get_job_ids()]
    assert sorted(p for group in named for p in group) == woken
    assert all(len(group) <= 4 for group in named)


def users_in_partitions(ws: int, parts: int, n: int) -> dict[int, str]:
    """One user id in each of ``n`` distinct partitions, by partition."""
    users: dict[int, str] = {}
    for i in range(10_000):
        users.setdefault(spool.partition_of(ws, f"u{i}", parts), f"u{i}")
        if len(users) == n:
            return users
    raise AssertionError("not enough partitions")


def test_a_group_is_applied_together_in_each_partitions_order(redis, ws):
    """Under a light flow one transaction carries every partition's few calls."""
    users = users_in_partitions(ws, 16, 3)
    spool.push(redis, [call(ws, 10 * k + i, user=u) for k, u in enumerate(users.values()) for i in range(3)], 16)
    applied: list[list[tuple[str, str]]] = []
    result = spool.drain(redis, list(users), lambda evs: applied.append([(e["userId"], e["messageId"]) for e in evs]),
                         batch_size=500, lock_ttl=5)
    assert len(applied) == 1 and len(applied[0]) == 9
    for k, u in enumerate(users.values()):  # each user's calls in the order sent
        assert [m for user, m in applied[0] if user == u] == [f"m{10 * k + i}" for i in range(3)]
    assert (result.chunks, result.events) == (1, 9)
    for p in users:
        assert redis.llen(spool.queue_key(p)) == redis.llen(spool.inflight_key(p)) == 0
        assert not redis.exists(spool.lock_key(p)) and not redis.exists(spool.wake_key(p))
    assert spool.workspace_counters(redis, ws) == {"received": 9, "pending": 0}


def test_a_group_shares_the_batch_size_between_its_partitions(redis, ws):
    users = users_in_partitions(ws, 16, 2)
    spool.push(redis, [call(ws, 100 * k + i, user=u) for k, u in enumerate(users.values()) for i in range(5)], 16)
    sizes: list[int] = []
    result = spool.drain(redis, list(users), lambda evs: sizes.append(len(evs)), batch_size=4, lock_ttl=5)
    # 2 from each partition per transaction, then the last one of each.
    assert sizes == [4, 4, 2] and result.events == 10


def test_a_partition_held_elsewhere_is_waited_for_while_the_rest_drain(redis, ws):
    users = users_in_partitions(ws, 16, 2)
    busy, free = list(users)
    spool.push(redis, [call(ws, i, user=users[p]) for i, p in enumerate([busy, free, busy])], 16)
    redis.set(spool.lock_key(busy), "another-drain", px=300)  # its holder hands over within 300 ms
    applied: list[list[str]] = []
    result = spool.drain(redis, [busy, free], lambda evs: applied.append([e["userId"] for e in evs]),
                         batch_size=10, lock_ttl=5)
    assert applied == [[users[free]], [users[busy], users[busy]]]
    assert result.events == 3 and redis.llen(spool.queue_key(busy)) == 0


def test_a_failed_group_leaves_its_chunks_inflight_and_hands_the_rest_on(redis, ws):
    """Claimed chunks stay inflight for the takeover; partitions not reached go to a new job."""
    users = users_in_partitions(ws, 16, 3)
    first, second, locked = list(users)
    spool.push(redis, [call(ws, i, user=users[p]) for i, p in enumerate([first, second, locked])], 16)
    redis.set(spool.lock_key(locked), "another-drain", px=60_000)
    handed: list[list[int]] = []

    def boom(events):
        raise RuntimeError("the database rejected the chunk")

    with pytest.raises(RuntimeError):
        spool.drain(redis, [first, second, locked], boom, batch_size=10, lock_ttl=5, handoff=handed.append)
    assert handed == [[locked]]
    assert redis.llen(spool.inflight_key(first)) == redis.llen(spool.inflight_key(second)) == 1
    assert not redis.exists(spool.lock_key(first)) and not redis.exists(spool.lock_key(second))


def test_a_drain_that_lost_one_lock_acknowledges_the_others_and_hands_them_on(redis, ws):
    users = users_in_partitions(ws, 16, 2)
    kept, lost = list(users)
    spool.push(redis, [call(ws, i, user=users[p]) for i, p in enumerate([kept, lost, kept])], 16)
    handed: list[list[int]] = []

    def stall(events):
        redis.set(spool.lock_key(lost), "someone-else", px=60_000)  # as if its TTL ran out mid-chunk

    with pytest.raises(spool.LockLost):
        spool.drain(redis, [kept, lost], stall, batch_size=1, lock_ttl=5, handoff=handed.append)
    assert redis.llen(spool.inflight_key(lost)) == 1  # left for its new holder
    assert redis.llen(spool.inflight_key(kept)) == 0 and redis.llen(spool.queue_key(kept)) == 1
    assert handed == [[kept]]
    assert redis.get(spool.lock_key(lost)) == b"someone-else"


def test_a_drain_out_of_time_hands_its_partitions_on(redis, ws):
    users = users_in_partitions(ws, 16, 2)
    spool.push(redis, [call(ws, i, user=u) for u in users.values() for i in range(3 * len(users))], 16)
    handed: list[list[int]] = []
    result = spool.drain(redis, list(users), lambda evs: None, batch_size=2, lock_ttl=5, max_seconds=0,
                         handoff=handed.append)
    assert result.chunks == 1 and result.events == 2
    assert sorted(handed[0]) == sorted(users)
    assert all(redis.exists(spool.wake_key(p)) and not redis.exists(spool.lock_key(p)) for p in users)


def test_a_failing_drain_job_hands_the_rest_of_its_group_on(redis, ws, runtime, monkeypatch):
    """Through the job: the partitions it did not get to are queued again, the failing ones are not."""
    from jobs import events as event_jobs
    from kana import broker

    parts = runtime.settings.partitions
    users = users_in_partitions(ws, parts, 3)
    first, second, locked = list(users)
    spool.push(redis, [call(ws, i, user=users[p]) for i, p in enumerate([first, second, locked])], parts)
    redis.set(spool.lock_key(locked), "another-drain", px=60_000)
    monkeypatch.setattr(processor, "process", lambda sessions, calls: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        event_jobs.drain([first, second, locked])
    coming = [spool.partitions_of_job(j) for j in broker.job_queue(redis, runtime.settings).get_job_ids()]
    assert sorted(p for group in coming for p in group) == [locked]
