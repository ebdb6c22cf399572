"""End-to-end benchmark: the real stack (gunicorn, RQ workers, PostgreSQL, Redis).

    python -m bench.run [--events 20000] [--workers 2] [--reps 3] [--users 10000]

Needs DATABASE_URL and REDIS_URL (PostgreSQL and Redis; the database is
migrated and a fresh workspace is used per repetition). Prints a summary and
writes a JSON report to bench/results/. It measures, side by side in one run:

* ingest: events/s accepted through /v1/batch (100 calls per request);
* end to end: events/s from the first request until nothing is pending;
* naive: the same calls as one RQ job + one commit each, same worker count.
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
from rq import Queue
from sqlalchemy import func, select

import config
from bench import RESULTS, write_report
from kana import db, migrate
from kana.broker import connect
from kana.domain import keys
from kana.ingest import spool
from kana.models import Event, Feature

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


class Stack:
    def __init__(self, env: dict[str, str], workers: int, web: bool = True) -> None:
        self.env = env
        self.web = web
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        py = sys.executable
        if web:
            self.procs.append(subprocess.Popen(
                [py, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{self.port}", "--workers", "2",
                 "--threads", "4", "--log-level", "warning"], cwd=ROOT, env=env))
        for _ in range(workers):
            self.procs.append(subprocess.Popen([py, "worker.py"], cwd=ROOT, env=env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if web:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    time.sleep(0.2)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs[1 if self.web else 0:]]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def new_workspace() -> tuple[int, str]:
    with db.SessionLocal.begin() as s:
        ws, key = keys.create_workspace(s, f"bench-{uuid.uuid4().hex[:6]}")
        s.add(Feature(workspace_id=ws.id, id="messages", name="Messages", type="consumable"))
        return ws.id, key


def stored(ws_id: int) -> int:
    with db.SessionLocal() as s:
        return s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws_id))


def run_ours(settings, env, calls, workers: int) -> dict:
    redis = connect(settings)
    redis.flushdb()
    ws_id, key = new_workspace()
    stack = Stack(env, workers)
    try:
        batches = [calls[i : i + 100] for i in range(0, len(calls), 100)]
        session = requests.Session()
        headers = {"Authorization": f"Bearer {key}"}

        def send(batch: list[dict]) -> float:
            t = time.perf_counter()
            r = session.post(f"{stack.url}/v1/batch", json={"batch": batch}, headers=headers, timeout=30)
            r.raise_for_status()
            return time.perf_counter() - t

        sampler = RssSampler(stack.worker_pids)
        sampler.start()
        start = time.perf_counter()
        with cf.ThreadPoolExecutor(4) as pool:
            latencies = list(pool.map(send, batches))
        ingest = time.perf_counter() - start
        # Redis first: counting a big events table every poll would load the
        # very PostgreSQL being measured. Depth 0 means every call committed.
        while spool.depth(redis, settings.partitions) or stored(ws_id) < len(calls):
            time.sleep(0.05)
        total = time.perf_counter() - start
        sampler.stop()
    finally:
        stack.stop()
    return {"ingest_events_per_s": len(calls) / ingest, "e2e_events_per_s": len(calls) / total,
            "batch_p50_ms": statistics.median(latencies) * 1000,
            "batch_p99_ms": sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000,
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

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[float] = []  # the largest worker's RSS at each tick
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            values = [v for v in map(rss_mb, self.pids) if v is not None]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--naive-events", type=int, default=None, help="calls for the naive run (default: --events)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--users", type=int, default=10000)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="length of each wrk run (when wrk is installed)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: tiny sizes, one repetition")
    args = ap.parse_args(argv)
    if args.smoke:
        args.events, args.users, args.reps, args.naive_events, args.wrk_seconds = 300, 50, 1, 100, 1

    settings = config.load()
    if settings.redis_url is None:
        print("set REDIS_URL (and DATABASE_URL) to the Redis and PostgreSQL to measure", file=sys.stderr)
        return 2
    migrate.upgrade(settings.database_url)
    db.configure(settings.database_url)
    env = dict(os.environ, DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url,
               SECRET_KEY=settings.secret_key, KANA_KEY_CACHE_TTL="60")
    calls = workload(args.events, args.users)
    naive_calls = calls[: args.naive_events or args.events]
    report: dict = {"when": datetime.now(UTC).isoformat(), "events": args.events, "users": args.users,
                    "database": settings.database_url.split("@")[-1], "runs": {}}
    receiver, floors = [], []
    for rep in range(args.reps):
        receiver.append(run_receiver(settings, env, calls, args.wrk_seconds))
        floors.append(run_floors(settings, calls))
        print(f"rep={rep + 1}: receiver {receiver[-1]}, floors {floors[-1]}", flush=True)
    report["receiver"] = {"runs": receiver, "median": medians(receiver), "client": receiver[0]["client"]}
    report["floors"] = {"runs": floors, "median": medians(floors)}
    report["receiver"]["ratio_batch_vs_redis_floor"] = (
        report["receiver"]["median"]["batch_events_per_s"] / report["floors"]["median"]["redis_push_events_per_s"])
    for workers in args.workers:
        ours, naive = [], []
        for rep in range(args.reps):
            ours.append(run_ours(settings, env, calls, workers))
            if not args.skip_naive:
                naive.append(run_naive(settings, env, naive_calls, workers))
            print(f"workers={workers} rep={rep + 1}: ours e2e {ours[-1]['e2e_events_per_s']:.0f}/s "
                  f"(ingest {ours[-1]['ingest_events_per_s']:.0f}/s)"
                  + (f", naive {naive[-1]['e2e_events_per_s']:.0f}/s" if naive else ""), flush=True)
        med = medians(ours)
        med["worker_rss_mb_peak"] = max(r["worker_rss_mb"].get("peak", 0) for r in ours)
        run = {"ours": ours, "median": med}
        if naive:
            naive_med = statistics.median(r["e2e_events_per_s"] for r in naive)
            run.update(naive=naive, naive_median_e2e=naive_med, ratio_vs_naive=med["e2e_events_per_s"] / naive_med)
        floor_pg = report["floors"]["median"]["postgres_insert_rows_per_s"]
        run["ratio_vs_postgres_floor"] = med["e2e_events_per_s"] / floor_pg
        report["runs"][str(workers)] = run
        print(f"SUMMARY workers={workers}: e2e {med['e2e_events_per_s']:.0f} events/s"
              + (f", naive {run['naive_median_e2e']:.0f} events/s, {run['ratio_vs_naive']:.1f}x naive" if naive
                 else "")
              + f", {run['ratio_vs_postgres_floor']:.2f}x the PostgreSQL insert floor"
              + f", worker RSS peak {med['worker_rss_mb_peak']:.0f} MB")
    rm = report["receiver"]["median"]
    print(f"SUMMARY receiver: /v1/batch {rm['batch_events_per_s']:.0f} events/s; /segment "
          f"{rm['segment_requests_per_s']:.0f} req/s, p50 {rm['segment_p50_ms']:.1f} ms, "
          f"p99 {rm['segment_p99_ms']:.1f} ms ({report['receiver']['client']}); batch ingest "
          f"{report['receiver']['ratio_batch_vs_redis_floor']:.2f}x the raw Redis push floor")
    write_report("bench", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
