"""Fault suite (SPEC §3 "Outages delay, they never stop"): real processes, real outages.

Each test runs the stack as real processes (gunicorn, ``python worker.py``,
``python -m kana.scheduler``) against its own ``redis-server`` on a free port,
sends traffic over HTTP while something fails, and asserts
sent = acknowledged + rejected and stored = acknowledged (usage too: every call
is a track counting 1). Run alone with ``pytest -m faults``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from redis import Redis

from kana.ingest import spool
from kana.models import Event
from tests.conftest import ROOT, make_workspace, worker_env
from tests.helpers import add_feature, count, usage_total, wait_until

pytestmark = [
    pytest.mark.faults,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on its own port, with AOF fsync'ed on every write (production's setting)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = Redis.from_url(self.url)
        wait_until(lambda: _pings(client), timeout=10)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def _pings(client: Redis) -> bool:
    try:
        return bool(client.ping())
    except OSError:
        return False
    except Exception:  # noqa: BLE001 - redis's ConnectionError while it starts
        return False


class TcpProxy:
    """A loopback TCP proxy to PostgreSQL that can be cut (listener closed, connections dropped) and restored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        # shutdown() first: a close() alone leaves a listener blocked in accept() listening.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@dataclass
class Stack:
    """Web, workers and scheduler as real processes; their output goes to files under ``logs``."""

    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    url: str = ""

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        self.procs[name] = proc
        return proc

    def web(self) -> None:
        port = free_port()
        self.spawn("web", [sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{port}",
                           "--workers", "1", "--threads", "8"])
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(self.url), timeout=60, interval=0.2)

    def worker(self, name: str) -> subprocess.Popen:
        return self.spawn(name, [sys.executable, str(ROOT / "worker.py")])

    def scheduler(self) -> subprocess.Popen:
        return self.spawn("scheduler", [sys.executable, "-m", "kana.scheduler"])

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def stack_for(app, settings, tmp_path) -> Iterator:
    stacks: list[Stack] = []

    def make(redis_url: str, database_url: str | None = None, **extra: str) -> Stack:
        env = worker_env(settings)
        env.pop("KANA_LOCK_TTL")  # the defaults are what the guarantees are stated for
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(REDIS_URL=redis_url, **extra)
        if database_url:
            env["DATABASE_URL"] = database_url
        logs = tmp_path / f"logs{len(stacks)}"
        logs.mkdir()
        stack = Stack(env, logs)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@dataclass
class Traffic:
    """Track calls (featureId "messages", 1 each) posted in batches over HTTP, retried like Segment does.

    A batch answered anything but 200 is sent again, with the same messageIds,
    until it is accepted (or ``give_up`` seconds pass: then it counts as
    rejected). A 503 may come after the calls were queued (Redis went away
    between the push and the reply); the retry is then deduplicated downstream.
    """

    url: str
    key: str
    batch: int = 20
    pause: float = 0.05
    give_up: float = 60.0
    sent: int = 0
    acknowledged: int = 0
    rejected: int = 0
    # (started, finished, status) of every request
    answers: list[tuple[float, float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _attempt(self, calls: list[dict]) -> tuple[int, dict]:
        started = time.monotonic()
        try:
            res = requests.post(f"{self.url}/v1/batch", json={"batch": calls}, auth=(self.key, ""), timeout=30)
            status, body = res.status_code, (res.json() if res.status_code == 200 else {})
        except requests.RequestException:
            status, body = 0, {}
        self.answers.append((started, time.monotonic(), status))
        return status, body

    def post(self, n: int) -> int:
        """Send n new calls in one batch, retrying until accepted; the status of the first attempt."""
        calls = [{"type": "track", "userId": f"user-{(self.sent + i) % 50}", "event": "Message Sent",
                  "messageId": f"fault-{self.sent + i}", "properties": {"featureId": "messages"}}
                 for i in range(n)]
        self.sent += n
        deadline = time.monotonic() + self.give_up
        first, body = self._attempt(calls)
        status = first
        while status != 200 and time.monotonic() < deadline:
            time.sleep(self.pause)
            status, body = self._attempt(calls)
        if status == 200:
            self.acknowledged += body["accepted"]
            self.rejected += len(body.get("rejected", []))
        else:
            self.rejected += n
        return first

    def start(self) -> None:
        def run() -> None:
            while not self._stop.is_set():
                self.post(self.batch)
                time.sleep(self.pause)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=self.give_up + 30)

    def statuses(self, start: float, end: float) -> set[int]:
        """Statuses of the requests that started and finished within [start, end]."""
        return {status for t0, t1, status in self.answers if t0 >= start and t1 <= end}

    def refused(self) -> int:
        return sum(1 for _, _, status in self.answers if status != 200)


def _wait_settled(redis: Redis, partitions: int, ws_id: int, expected: int, timeout: float = 60) -> None:
    try:
        wait_until(lambda: spool.depth(redis, partitions) == 0 and count(Event, ws_id) == expected,
                   timeout=timeout, interval=0.2)
    except AssertionError:
        raise AssertionError(f"not settled within {timeout}s: pending {spool.depth(redis, partitions)}, "
                             f"stored {count(Event, ws_id)}, acknowledged {expected}") from None


def _workspace() -> tuple[int, str]:
    ws = make_workspace("faults")
    add_feature(ws.id)
    return ws.id, ws.ingest_key


def _report(name: str, **figures: object) -> None:
    # Printed for the README's Guarantees table (pytest -s shows it).
    print(f"\n[guarantee] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def test_redis_stopped_mid_traffic(settings, redis_server, stack_for):
    """Redis stopped 10 s under traffic: no 200 while it is down; every process resumes on its own."""
    server = redis_server
    redis = Redis.from_url(server.url)
    ws_id, key = _workspace()
    stack = stack_for(server.url, KANA_RECOVER_INTERVAL="2")  # so the scheduler is at work during the outage
    stack.web()
    workers = [stack.worker("worker1"), stack.worker("worker2")]
    scheduler = stack.scheduler()
    traffic = Traffic(stack.url, key)
    traffic.start()
    time.sleep(3)
    server.stop()
    down_at = time.monotonic()
    time.sleep(5)
    ready = requests.get(f"{stack.url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unreachable")
    time.sleep(down_at + 10 - time.monotonic())
    back_at = time.monotonic()
    server.start()
    time.sleep(3)
    traffic.stop()

    assert traffic.statuses(down_at, back_at) == {503}, "only 503 while Redis is down"
    assert traffic.sent == traffic.acknowledged + traffic.rejected
    assert traffic.refused() > 0 and traffic.acknowledged > 0
    _wait_settled(redis, settings.partitions, ws_id, traffic.acknowledged)
    drained = time.monotonic() - back_at
    assert drained <= 30, f"drained {drained:.1f}s after Redis's return"
    assert count(Event, ws_id) == traffic.acknowledged
    assert usage_total(ws_id) == traffic.acknowledged
    for proc in [*workers, scheduler]:
        assert proc.poll() is None, "a process exited during the outage"
    # One line when Redis went, one when it came back: not one per retry.
    for name in ("worker1", "worker2", "scheduler"):
        log = stack.log(name)
        assert log.count("redis unreachable") == 1, log
        assert log.count("redis back after") == 1, log
    _report("redis stopped", calls=traffic.sent, acknowledged=traffic.acknowledged, answers_503=traffic.refused(),
            outage_s=10, drained_after_return_s=round(drained, 1))


@pytest.mark.skipif(not os.environ.get("KANA_TEST_DATABASE_URL", "").startswith("postgres"),
                    reason="cuts a PostgreSQL connection")
def test_postgres_cut_receiver_keeps_answering(settings, redis_server, stack_for):
    """PostgreSQL unreachable for 25 s: the receiver answers 200 to known keys throughout; nothing is lost."""
    from sqlalchemy.engine import make_url

    server = redis_server
    redis = Redis.from_url(server.url)
    ws_id, key = _workspace()
    db = make_url(settings.database_url)
    proxy = TcpProxy((db.host or "127.0.0.1", db.port or 5432))
    proxy.start()
    through_proxy = db.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    # A 1 s key cache: during the cut the keys must come from Redis, not from this process's memory.
    stack = stack_for(server.url, through_proxy, KANA_KEY_CACHE_TTL="1")
    stack.web()
    workers = [stack.worker("worker1"), stack.worker("worker2")]
    traffic = Traffic(stack.url, key)
    traffic.start()
    time.sleep(2)
    proxy.cut()
    cut_at = time.monotonic()
    time.sleep(5)
    # Ready (it accepts calls), and says what is down.
    ready = requests.get(f"{stack.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "degraded" and ready.json()["checks"]["database"].startswith("unreachable")
    time.sleep(cut_at + 25 - time.monotonic())
    proxy.start()
    back_at = time.monotonic()
    time.sleep(2)
    traffic.stop()

    during = traffic.statuses(cut_at, back_at)
    assert during == {200}, f"answers while PostgreSQL was cut: {during}"
    assert {status for _, _, status in traffic.answers} == {200}
    assert traffic.sent == traffic.acknowledged + traffic.rejected
    _wait_settled(redis, settings.partitions, ws_id, traffic.acknowledged)
    drained = time.monotonic() - back_at
    assert count(Event, ws_id) == traffic.acknowledged
    assert usage_total(ws_id) == traffic.acknowledged
    for proc in workers:
        assert proc.poll() is None
    assert stack.log("worker1").count("database unreachable") <= 1
    assert stack.log("worker2").count("database unreachable") <= 1
    during_calls = sum(1 for t0, t1, _ in traffic.answers if t0 >= cut_at and t1 <= back_at) * traffic.batch
    _report("postgres cut", calls=traffic.sent, calls_during_cut=during_calls, outage_s=25,
            drained_after_return_s=round(drained, 1))


def test_workers_killed_mid_chunk_taken_over_without_scheduler(settings, redis_server, stack_for):
    """6,000 calls; both workers SIGKILLed 0.3 s into the drain; two fresh ones finish exactly, no scheduler."""
    server = redis_server
    redis = Redis.from_url(server.url)
    ws_id, key = _workspace()
    stack = stack_for(server.url)
    stack.web()
    traffic = Traffic(stack.url, key, batch=100)
    n = 6000
    while traffic.sent < n:
        assert traffic.post(100) == 200
    assert traffic.sent == traffic.acknowledged + traffic.rejected == n + traffic.rejected
    victims = [stack.worker("victim1"), stack.worker("victim2")]
    wait_until(lambda: count(Event, ws_id) > 0, timeout=60, interval=0.02)
    time.sleep(0.3)
    for proc in victims:
        proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for proc in victims:
        proc.wait()
    left = n - count(Event, ws_id)
    assert left > 0, "the workers finished before they were killed"
    stack.worker("worker1")
    stack.worker("worker2")
    _wait_settled(redis, settings.partitions, ws_id, n)
    recovered = time.monotonic() - killed_at
    assert usage_total(ws_id) == n
    assert recovered <= 19, f"nothing pending {recovered:.1f}s after the kill"
    _report("workers SIGKILLed", calls=n, left_when_killed=left, recovered_after_kill_s=round(recovered, 1))
