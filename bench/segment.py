"""Segment Actions batches through /segment on the web process as the Procfile runs it.

    DATABASE_URL=... REDIS_URL=... python -m bench.segment [--requests 12] [--concurrency 1 2] [--workers 2]
    python -m bench.segment --parsers        # only the JSON parser comparison (no services needed)

Starts the Procfile's ``web:`` command itself (gunicorn app:app with its flags),
creates a workspace with a Segment shared secret, and POSTs signed 4,000-event
arrays (tests/fixtures/segment: ~5.6 MB of realistic events each) to
``/segment/{workspace_id}``. Reports requests/s, events/s, p50/p99 latency and
each web worker's peak RSS growth (VmHWM after the run minus VmRSS before it)
against the body size; then, with ``--workers``, drains everything to the
database, checks every event is stored once, and measures the bytes an event
row takes with and without its context and timestamps. ``--parsers`` compares
the ways to parse such a body in memory (json, orjson when installed, ijson).
Writes a JSON report under bench/results/.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import bench

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-segment-shared-secret"


# --- parser comparison ---------------------------------------------------------------------------


def _status(pid: int | str, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _probe(kind: str, path: str) -> None:
    """In a fresh process: parse the array the way ``kind`` would and keep each event serialised."""
    data = bytearray(Path(path).read_bytes())
    if kind == "orjson":
        import orjson
    elif kind == "ijson":
        import ijson

        from kana.ingest.receiver import _Reader
    # Imports done first: only the parse is measured.
    base = _status("self", "VmRSS")
    start = time.perf_counter()
    kept: list[str] = []
    if kind == "json":
        items = json.loads(data.decode())
    elif kind == "orjson":
        items = orjson.loads(data)
    else:
        items = ijson.items(_Reader(data), "item", use_float=True)
    for item in items:
        kept.append(json.dumps(item, separators=(",", ":"), ensure_ascii=False))
    seconds = time.perf_counter() - start
    print(json.dumps({"parser": kind, "seconds": seconds, "peak_growth_mb": _status("self", "VmHWM") - base,
                      "body_mb": len(data) / 2**20}))


def compare_parsers(raw: bytes) -> list[dict]:
    out = []
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(raw)
        f.flush()
        for kind in ("json", "orjson", "ijson"):
            proc = subprocess.run([sys.executable, "-m", "bench.segment", "--probe", kind, f.name], cwd=ROOT,
                                  capture_output=True, text=True)
            if proc.returncode:
                print(f"{kind}: not measured ({proc.stderr.strip().splitlines()[-1]})")
                continue
            out.append(json.loads(proc.stdout))
            print(f"{kind:7s} {out[-1]['seconds'] * 1000:7.0f} ms  peak +{out[-1]['peak_growth_mb']:.1f} MB "
                  f"for a {out[-1]['body_mb']:.1f} MB body")
    return out


# --- the web process -------------------------------------------------------------------------------


class Web:
    """The Procfile's web command, run by bash exactly as a Procfile runner would."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        line = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("web:"))
        self.command = line.split(":", 1)[1].strip()
        self.url = f"http://127.0.0.1:{port}"
        # Its own metrics directory: the command empties it at start.
        env = {**env, "PORT": str(port), "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               "PROMETHEUS_MULTIPROC_DIR": tempfile.mkdtemp(prefix="kana-bench-prom-")}
        self.proc = subprocess.Popen(["bash", "-c", self.command], cwd=ROOT, env=env)

    def wait_ready(self) -> None:
        if not bench.wait_healthy(self.url):
            raise RuntimeError("the web process did not come up")

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(c) for c in children]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _reset_peak(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def run_load(web: Web, ws_id: int, bodies: list[bytes], concurrency: int, requests_mod, sign) -> dict:  # noqa: ANN001
    pids = web.workers()
    base = {pid: _status(pid, "VmRSS") for pid in pids}
    for pid in pids:
        _reset_peak(pid)

    def send(raw: bytes) -> float:
        session = requests_mod.Session()
        t = time.perf_counter()
        r = session.post(f"{web.url}/segment/{ws_id}", data=raw, timeout=120,
                         headers={"Content-Type": "application/json", "X-Signature": sign(raw, SECRET)})
        if r.status_code != 200 or r.json().get("accepted") != 4000:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
        return time.perf_counter() - t

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(send, bodies))
    elapsed = time.perf_counter() - start
    growth = {pid: _status(pid, "VmHWM") - base[pid] for pid in pids}
    body_mb = statistics.mean(len(b) for b in bodies) / 2**20
    p99 = latencies[max(0, int(len(latencies) * 0.99 + 0.999) - 1)]
    return {
        "concurrency": concurrency, "requests": len(bodies), "body_mb": body_mb,
        "requests_per_s": len(bodies) / elapsed, "events_per_s": 4000 * len(bodies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000, "p99_ms": p99 * 1000,
        "web_worker_base_rss_mb": base, "web_worker_peak_growth_mb": growth,
        "peak_growth_over_body": max(growth.values()) / body_mb,
    }


def storage(ws_id: int) -> dict:
    """Bytes per event row with and without the context/timestamps columns (PostgreSQL)."""
    from sqlalchemy import text

    from kana import db

    with db.SessionLocal() as s:
        row = s.execute(text(
            "SELECT count(*), avg(pg_column_size(e.*)), "
            "avg(coalesce(pg_column_size(e.context), 0) + coalesce(pg_column_size(e.timestamps), 0)) "
            "FROM events e WHERE workspace_id = :ws"), {"ws": ws_id}).one()
        table = s.execute(text("SELECT pg_total_relation_size('events'), (SELECT count(*) FROM events)")).one()
    n, with_ctx, ctx = int(row[0]), float(row[1]), float(row[2])
    return {"events": n, "row_bytes_with_context": with_ctx, "row_bytes_without_context": with_ctx - ctx,
            "context_and_timestamps_bytes": ctx, "events_table_bytes_per_row": table[0] / max(1, table[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="signed 4,000-event arrays per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, default=2, help="RQ workers draining to the database (0: none)")
    parser.add_argument("--parsers", action="store_true", help="only compare JSON parsers")
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--web-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="extra environment for the web process, e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.probe:
        _probe(*args.probe)
        return

    from bench import write_report
    from tests.fixtures import segment as fixtures

    sample = fixtures.body(fixtures.actions_batch(4000, tag="parsers"))
    print(f"parsing one 4,000-event array ({len(sample) / 2**20:.1f} MB):")
    parsers = compare_parsers(sample)
    if args.parsers:
        write_report("segment-parsers", {"parsers": parsers}, args.out)
        return

    import requests
    from sqlalchemy import func, select

    import config
    from bench.run import free_port
    from kana import db, migrate
    from kana.broker import connect
    from kana.domain import keys
    from kana.domain import workspace as workspaces
    from kana.ingest import spool
    from kana.models import Event

    env = dict(os.environ)
    if not env.get("DATABASE_URL") or not env.get("REDIS_URL"):
        sys.exit("DATABASE_URL and REDIS_URL (PostgreSQL and Redis) are required")
    settings = config.load()
    migrate.upgrade(settings.database_url)
    db.configure(settings.database_url)
    redis = connect(settings)
    redis.flushdb()
    with db.SessionLocal.begin() as s:
        ws, _ = keys.create_workspace(s, f"bench-segment-{uuid.uuid4().hex[:6]}")
        workspaces.update(s, ws.id, {"segment_shared_secret": SECRET})
        ws_id = ws.id
    web_env = dict(item.split("=", 1) for item in args.web_env)
    web = Web({**env, **web_env}, free_port())
    report: dict = {"parsers": parsers, "web_command": web.command, "web_env": web_env, "runs": []}
    sent = 0
    try:
        web.wait_ready()
        # First a warm-up at the highest concurrency on the fresh workers: its growth is the cold cost (each
        # worker thread's allocator growing to one request's working set); the levels after it are steady state.
        levels = [("cold", max(args.concurrency))] + [("steady", c) for c in args.concurrency]
        for phase, concurrency in levels:
            bodies = [fixtures.body(fixtures.actions_batch(4000, seed=i, tag=f"{phase}{concurrency}"))
                      for i in range(args.requests)]
            run = run_load(web, ws_id, bodies, concurrency, requests, fixtures.sign)
            run["phase"] = phase
            sent += 4000 * len(bodies)
            del bodies
            report["runs"].append(run)
            print(f"{phase} c={concurrency}: {run['requests_per_s']:.2f} req/s, {run['events_per_s']:,.0f} events/s, "
                  f"p50 {run['p50_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms, web worker peak RSS "
                  f"+{max(run['web_worker_peak_growth_mb'].values()):.1f} MB for {run['body_mb']:.1f} MB bodies "
                  f"({run['peak_growth_over_body']:.2f}x)")
    finally:
        web.stop()
    if args.workers:
        procs = [subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for _ in range(args.workers)]
        start = time.perf_counter()
        try:
            while spool.depth(redis, settings.partitions):
                time.sleep(0.5)
            with db.SessionLocal() as s:
                stored = s.scalar(select(func.count()).select_from(Event).where(Event.workspace_id == ws_id))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
        report["drain"] = {"workers": args.workers, "events": sent, "stored": stored,
                           "seconds": time.perf_counter() - start}
        print(f"drained {stored:,} of {sent:,} events in {report['drain']['seconds']:.0f} s "
              f"with {args.workers} workers")
        if settings.database_url.startswith("postgresql"):
            report["storage"] = storage(ws_id)
            st = report["storage"]
            print(f"event row: {st['row_bytes_without_context']:.0f} B without context/timestamps, "
                  f"{st['row_bytes_with_context']:.0f} B with (+{st['context_and_timestamps_bytes']:.0f} B); "
                  f"events table incl. indexes and TOAST: {st['events_table_bytes_per_row']:.0f} B/row")
    redis.flushdb()
    write_report("segment", report, args.out)


if __name__ == "__main__":
    main()
