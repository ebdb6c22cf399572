"""End-to-end benchmark: the real stack (the Procfile's web process, RQ workers, PostgreSQL, Redis).

    python -m bench.run [--events 20000] [--workers 2] [--reps 3] [--users 2000] [--code DIR]

Needs DATABASE_URL and REDIS_URL (PostgreSQL and Redis). The database (its
name must contain "bench") is emptied and migrated first (a fresh installation: its
tables grow during the run with stale planner statistics). Each repetition
uses a new workspace whose ``--users`` users exist before the clock starts
(steady state) and the mixed workload (identify 15%, track with featureId 70%,
unmapped track 10%, page 5%) sent as 100-call /v1/batch requests by
``--senders`` concurrent connections. Measured, per worker count, medians of
``--reps`` repetitions, each next to the PostgreSQL 500-row insert floor of the
same repetition:

* backlog: every call queued first (no worker running), then the workers
  started; events/s from the first worker ready until every event is stored;
* live: the workers running, calls sent; events/s from the first request until
  every event is stored (end to end, receiver on the same cores);
* with ``--receiver`` / ``--naive``: the receiver alone (wrk when installed)
  and the naive one-job-per-call design.

``--code DIR`` runs the web and worker processes of another checkout (e.g. a
worktree of main) for a before/after comparison in one session.
Prints a summary and writes a JSON report to bench/results/.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import requests
from rq import Queue, Worker
from sqlalchemy import func, insert, select

import bench
import config
from bench import RESULTS, write_report
from kana import db, migrate
from kana.broker import connect
from kana.domain import keys
from kana.ingest import spool
from kana.models import Event, Feature, User

ROOT = Path(__file__).resolve().parent.parent


def workload(n: int, users: int, seed: int = 7) -> list[dict]:
    """identify 15% (emails, some shared), track+featureId 70%, unmapped track 10%, page 5%."""
    rnd = random.Random(seed)
    calls = []
    for i in range(n):
        uid = f"user-{rnd.randrange(users)}"
        r = rnd.random()
        mid = f"b-{i}-{uuid.uuid4().hex[:8]}"
        if r < 0.15:
            calls.append({"type": "identify", "userId": uid, "messageId": mid,
                          "traits": {"email": f"{uid}@example.com", "name": uid.title()}})
        elif r < 0.85:
            calls.append({"type": "track", "userId": uid, "messageId": mid, "event": "Message Sent",
                          "properties": {"featureId": "messages", "delta": rnd.randint(1, 3)}})
        elif r < 0.95:
            calls.append({"type": "track", "userId": uid, "messageId": mid, "event": "Report Exported",
                          "properties": {"format": "csv", "plan": {"tier": "pro"}}})
        else:
            calls.append({"type": "page", "userId": uid, "messageId": mid, "name": "Pricing",
                          "properties": {"url": "https://example.com/pricing"}})
    return calls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def procfile(code: Path, name: str) -> str:
    for line in (code / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise LookupError(f"no {name} process in {code / 'Procfile'}")


class Stack:
    """The web process exactly as the Procfile runs it, and ``python worker.py`` workers, from ``code``."""

    def __init__(self, env: dict[str, str], workers: int, web: bool = True, code: Path = ROOT) -> None:
        self.code = code
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="kana-bench-")
        # The checkout measured comes first on the path; the venv's tools (gunicorn) are on PATH.
        self.env = dict(env, PYTHONPATH=str(code), PORT=str(self.port),
                        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
                        PROMETHEUS_MULTIPROC_DIR=str(Path(self.tmp, "prometheus")),
                        # gunicorn keeps a control socket under $HOME: one per stack, not shared.
                        HOME=self.tmp)
        self.web: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        if web:
            self.web = subprocess.Popen(["bash", "-c", procfile(code, "web")], cwd=code, env=self.env,
                                        start_new_session=True)
            bench.wait_healthy(self.url)
        self.start_workers(workers)

    def start_workers(self, n: int) -> None:
        command = procfile(self.code, "worker").split()
        command[0] = sys.executable if command[0] == "python" else command[0]
        for _ in range(n):
            self.workers.append(subprocess.Popen(command, cwd=self.code, env=self.env,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.workers]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        procs = self.workers + ([self.web] if self.web else [])
        for p in self.workers:
            p.terminate()
        if self.web is not None:
            os.killpg(self.web.pid, 15)  # gunicorn's master and its workers
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def new_workspace() -> tuple[int, str]:
    with db.SessionLocal.begin() as s:
        ws, key = keys.create_workspace(s, f"bench-{uuid.uuid4().hex[:6]}")
        s.add(Feature(workspace_id=ws.id, id="messages", name="Messages", type="consumable"))
        return ws.id, key


def stored(ws_id: int) -> int:
    with db.SessionLocal() as s:
        return s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws_id))


def steady_users(ws_id: int, users: int) -> None:
    """The workload's users, existing before the clock starts (with the emails its identify calls send)."""
    now = datetime.now(UTC)
    rows = [{"workspace_id": ws_id, "user_id": f"user-{i}", "email": f"user-{i}@example.com",
             "email_key": f"user-{i}@example.com", "name": f"User-{i}", "source": "segment",
             "created_at": now, "updated_at": now} for i in range(users)]
    with db.SessionLocal.begin() as s:
        s.execute(insert(User), rows)


def send_all(url: str, key: str, calls: list[dict], senders: int) -> list[float]:
    """POST the calls as 100-call /v1/batch requests over ``senders`` connections; each request's latency."""
    bodies = [json.dumps({"batch": calls[i : i + 100]}) for i in range(0, len(calls), 100)]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def sender(part: list[str]) -> list[float]:
        session = requests.Session()
        out = []
        for body in part:
            t = time.perf_counter()
            session.post(f"{url}/v1/batch", data=body, headers=headers, timeout=60).raise_for_status()
            out.append(time.perf_counter() - t)
        return out

    with cf.ThreadPoolExecutor(senders) as pool:
        return [x for part in pool.map(sender, [bodies[i::senders] for i in range(senders)]) for x in part]


def wait_stored(redis, settings, ws_id: int, n: int, timeout: float = 900) -> None:
    # Redis first: counting a big events table every poll would load the very
    # PostgreSQL being measured. Depth 0 means every call committed.
    deadline = time.monotonic() + timeout
    while spool.depth(redis, settings.partitions) or stored(ws_id) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stored(ws_id)} of {n} events stored after {timeout:.0f}s")
        time.sleep(0.05)


def workers_ready(redis, n: int) -> None:
    """Until the first of the workers has registered (it takes jobs right after)."""
    deadline = time.monotonic() + 60
    while Worker.count(connection=redis) < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("no worker registered within 60 s")
        time.sleep(0.005)


def run_drain(settings, env, calls, workers: int, *, mode: str, users: int, senders: int,
              code: Path = ROOT) -> dict:
    """``backlog``: queue every call, then start the workers; ``live``: send while they run."""
    redis = connect(settings)
    redis.flushdb()
    ws_id, key = new_workspace()
    steady_users(ws_id, users)
    calls = [dict(c, messageId=f"{c['messageId']}-{ws_id}") for c in calls]
    stack = Stack(env, 0 if mode == "backlog" else workers, code=code)
    try:
        sampler = RssSampler(stack)
        if mode == "backlog":
            t = time.perf_counter()
            latencies = send_all(stack.url, key, calls, senders)
            ingest = len(calls) / (time.perf_counter() - t)
            stack.start_workers(workers)
            workers_ready(redis, workers)
        else:
            workers_ready(redis, workers)
            time.sleep(1.0)  # every worker up, not only the first
        sampler.start()
        start = time.perf_counter()
        if mode == "live":
            latencies = send_all(stack.url, key, calls, senders)
            ingest = len(calls) / (time.perf_counter() - start)
        wait_stored(redis, settings, ws_id, len(calls))
        total = time.perf_counter() - start
        sampler.stop()
    finally:
        stack.stop()
    latencies.sort()
    return {"events_per_s": len(calls) / total, "ingest_events_per_s": ingest,
            "batch_p50_ms": latencies[len(latencies) // 2] * 1000,
            "batch_p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
            "worker_rss_mb": sampler.summary()}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    """Samples each worker's resident memory twice a second during a run."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.samples: list[float] = []  # the largest worker's RSS at each tick
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            values = [v for v in map(rss_mb, self.stack.worker_pids) if v is not None]
            if values:
                self.samples.append(max(values))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        tenth = max(1, len(self.samples) // 10)
        # "Flat" means the last tenth of the run sits where the first tenth did.
        return {"first_tenth": statistics.median(self.samples[:tenth]),
                "last_tenth": statistics.median(self.samples[-tenth:]),
                "peak": max(self.samples), "samples": len(self.samples)}


def run_receiver(settings, env, calls, wrk_seconds: int = 10) -> dict:
    """The receiver alone (no workers): /v1/batch of 100 and single-call /segment."""
    redis = connect(settings)
    redis.flushdb()
    ws_id, key = new_workspace()
    stack = Stack(env, workers=0)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        bodies = [json.dumps({"batch": calls[i : i + 100]}) for i in range(0, len(calls), 100)]
        singles = [json.dumps(c) for c in calls[: min(len(calls), 5000)]]

        def blast(path: str, payloads: list[str], threads: int) -> tuple[float, list[float]]:
            chunks = [payloads[i::threads] for i in range(threads)]

            def worker(chunk: list[str]) -> list[float]:
                session = requests.Session()
                out = []
                for body in chunk:
                    t = time.perf_counter()
                    r = session.post(f"{stack.url}{path}", data=body, headers=headers, timeout=30)
                    r.raise_for_status()
                    out.append(time.perf_counter() - t)
                return out

            start = time.perf_counter()
            with cf.ThreadPoolExecutor(threads) as pool:
                lat = [x for part in pool.map(worker, chunks) for x in part]
            return time.perf_counter() - start, lat

        if shutil.which("wrk"):
            # wrk (C, epoll) costs the 2-core box far less CPU than Python clients,
            # so it measures the receiver rather than the load generator.
            batch = wrk_blast(stack.url, "/v1/batch", key, bodies, connections=4, seconds=wrk_seconds)
            single = wrk_blast(stack.url, "/segment", key, singles, connections=8, seconds=wrk_seconds)
            return {"client": "wrk", "batch_events_per_s": batch["requests_per_s"] * 100,
                    "batch_p50_ms": batch["p50_ms"], "batch_p99_ms": batch["p99_ms"],
                    "segment_requests_per_s": single["requests_per_s"],
                    "segment_p50_ms": single["p50_ms"], "segment_p99_ms": single["p99_ms"]}
        batch_time, batch_lat = blast("/v1/batch", bodies, 4)
        single_time, single_lat = blast("/segment", singles, 8)
    finally:
        stack.stop()
    batch_lat.sort()
    single_lat.sort()
    return {
        "client": "python-requests",
        "batch_events_per_s": len(calls) / batch_time,
        "batch_p50_ms": batch_lat[len(batch_lat) // 2] * 1000,
        "batch_p99_ms": batch_lat[int(len(batch_lat) * 0.99) - 1] * 1000,
        "segment_requests_per_s": len(singles) / single_time,
        "segment_p50_ms": single_lat[len(single_lat) // 2] * 1000,
        "segment_p99_ms": single_lat[int(len(single_lat) * 0.99) - 1] * 1000,
    }


# Cycles through the prepared bodies (one JSON document per line), each thread
# from its own offset, so requests carry distinct users and messageIds.
WRK_SCRIPT = """
local bodies, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  wrk.headers["Authorization"] = "Bearer " .. args[2]
  wrk.headers["Content-Type"] = "application/json"
  i = math.random(#bodies)
end
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, nil, bodies[i])
end
"""
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_blast(url: str, path: str, key: str, bodies: list[str], *, connections: int, seconds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        script, data = Path(tmp, "post.lua"), Path(tmp, "bodies.jsonl")
        script.write_text(WRK_SCRIPT)
        data.write_text("\n".join(bodies) + "\n")
        out = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url + path,
             "--", str(data), key],
            capture_output=True, text=True, check=True,
        ).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw error responses from {path}:\n{out}")
    return wrk_figures(out)


def wrk_figures(out: str) -> dict:
    """Requests/s and latency percentiles (ms) from ``wrk --latency`` output."""

    def percentile(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
        assert match, out
        return float(match.group(1)) * _UNITS[match.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert rps, out
    return {"requests_per_s": float(rps.group(1)), "p50_ms": percentile("50"), "p90_ms": percentile("90"),
            "p99_ms": percentile("99")}


def run_floors(settings, calls) -> dict:
    """The same work at the storage floor: raw Redis pushes, 500-row PostgreSQL inserts."""
    redis = connect(settings)
    redis.flushdb()
    payloads = [json.dumps(c) for c in calls]
    start = time.perf_counter()
    for i in range(0, len(payloads), 100):
        pipe = redis.pipeline(transaction=True)
        pipe.rpush("bench:raw", *payloads[i : i + 100])
        pipe.execute()
    redis_rate = len(payloads) / (time.perf_counter() - start)
    redis.delete("bench:raw")
    engine = db.get_engine()
    now = datetime.now(UTC)
    rows = [{"message_id": c["messageId"], "type": c["type"], "user_id": c["userId"],
             "properties": json.dumps(c.get("properties") or c.get("traits") or {}), "ts": now} for c in calls]
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS bench_floor")
        conn.exec_driver_sql("CREATE TABLE bench_floor (id bigserial primary key, message_id text unique, "
                             "type text, user_id text, properties json, ts timestamptz)")
    from sqlalchemy import text

    insert = text("INSERT INTO bench_floor (message_id, type, user_id, properties, ts) "
                  "VALUES (:message_id, :type, :user_id, :properties, :ts)")
    start = time.perf_counter()
    for i in range(0, len(rows), 500):
        with engine.begin() as conn:
            conn.execute(insert, rows[i : i + 500])
    pg_rate = len(rows) / (time.perf_counter() - start)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE bench_floor")
    return {"redis_push_events_per_s": redis_rate, "postgres_insert_rows_per_s": pg_rate}


def run_naive(settings, env, calls, workers: int) -> dict:
    redis = connect(settings)
    redis.flushdb()
    ws_id, _ = new_workspace()
    now = datetime.now(UTC).isoformat()
    q = Queue("naive", connection=redis)
    jobs = [Queue.prepare_data("bench.naive.apply_one", args=(dict(c, ws=ws_id, timestamp=now, receivedAt=now),),
                               result_ttl=0) for c in calls]
    start = time.perf_counter()
    for i in range(0, len(jobs), 1000):
        q.enqueue_many(jobs[i : i + 1000])
    stack = Stack(dict(env, KANA_QUEUE="naive"), workers, web=False)
    try:
        while len(q) or stored(ws_id) < len(calls):
            time.sleep(0.05)
        total = time.perf_counter() - start
    finally:
        stack.stop()
    return {"e2e_events_per_s": len(calls) / total}


def medians(runs: list[dict]) -> dict:
    """Per-key medians of the numeric results of repeated runs."""
    return {k: statistics.median(r[k] for r in runs) for k, v in runs[0].items() if isinstance(v, int | float)}


def fresh_database(url: str) -> None:
    """Empty a benchmark database (its name says "bench") and migrate it: tables start empty, statistics go stale."""
    from sqlalchemy.engine import make_url

    name = make_url(url).database or ""
    if "bench" not in name:
        raise SystemExit(f"emptying the database first: refusing {name!r} (its name must contain 'bench'; "
                         "or pass --no-fresh)")
    with db.get_engine().begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    db.get_engine().dispose()
    migrate.upgrade(url)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--users", type=int, default=2000, help="users created before the clock starts")
    ap.add_argument("--senders", type=int, default=8, help="concurrent /v1/batch connections")
    ap.add_argument("--modes", nargs="+", default=["backlog", "live"], choices=["backlog", "live"])
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose web and worker processes run")
    ap.add_argument("--no-fresh", dest="fresh", action="store_false",
                    help="keep the database's tables (default: empty a bench* database first)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--receiver", action="store_true", help="also measure the receiver alone")
    ap.add_argument("--naive", action="store_true", help="also measure one RQ job per call")
    ap.add_argument("--naive-events", type=int, default=None, help="calls for the naive run (default: --events)")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="length of each wrk run (when wrk is installed)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: tiny sizes, one repetition")
    args = ap.parse_args(argv)
    if args.smoke:
        args.events, args.users, args.reps, args.naive_events, args.wrk_seconds = 300, 50, 1, 100, 1

    settings = config.load()
    if settings.redis_url is None:
        print("set REDIS_URL (and DATABASE_URL) to the Redis and PostgreSQL to measure", file=sys.stderr)
        return 2
    db.configure(settings.database_url)
    if args.fresh:
        fresh_database(settings.database_url)
    else:
        migrate.upgrade(settings.database_url)
    code = args.code.resolve()
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    env = dict(os.environ, DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url,
               SECRET_KEY=settings.secret_key, KANA_KEY_CACHE_TTL="60")
    calls = workload(args.events, args.users)
    report: dict = {"when": datetime.now(UTC).isoformat(), "events": args.events, "users": args.users,
                    "senders": args.senders, "code": str(code), "commit": commit, "fresh_database": args.fresh,
                    "database": settings.database_url.split("@")[-1], "runs": {}}
    for workers in args.workers:
        for mode in args.modes:
            runs = []
            for rep in range(args.reps):
                run = run_drain(settings, env, calls, workers, mode=mode, users=args.users,
                                senders=args.senders, code=code)
                run["floor_rows_per_s"] = run_floors(settings, calls)["postgres_insert_rows_per_s"]
                run["ratio_to_floor"] = run["events_per_s"] / run["floor_rows_per_s"]
                runs.append(run)
                print(f"workers={workers} {mode} rep={rep + 1}: {run['events_per_s']:.0f} events/s, floor "
                      f"{run['floor_rows_per_s']:.0f} rows/s ({run['ratio_to_floor']:.1%}), sent at "
                      f"{run['ingest_events_per_s']:.0f}/s, RSS {run['worker_rss_mb']}", flush=True)
            med = medians(runs)
            med["worker_rss_mb_peak"] = max(r["worker_rss_mb"].get("peak", 0) for r in runs)
            report["runs"][f"{mode}-{workers}"] = {"mode": mode, "workers": workers, "runs": runs, "median": med}
            print(f"SUMMARY {mode} workers={workers}: {med['events_per_s']:.0f} events/s, "
                  f"{med['ratio_to_floor']:.1%} of the floor (median {med['floor_rows_per_s']:.0f} rows/s), "
                  f"worker RSS peak {med['worker_rss_mb_peak']:.0f} MB", flush=True)
    if args.receiver:
        receiver = [run_receiver(settings, env, calls, args.wrk_seconds) for _ in range(args.reps)]
        report["receiver"] = {"runs": receiver, "median": medians(receiver), "client": receiver[0]["client"]}
        print(f"SUMMARY receiver: {report['receiver']['median']}")
    if args.naive:
        naive_calls = calls[: args.naive_events or args.events]
        for workers in args.workers:
            naive = [run_naive(settings, env, naive_calls, workers) for _ in range(args.reps)]
            report["runs"][f"naive-{workers}"] = {"runs": naive, "median": medians(naive)}
            print(f"SUMMARY naive workers={workers}: {medians(naive)}")
    write_report("bench", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
