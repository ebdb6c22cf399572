"""Entitlement checks: latency and freshness against the real stack (SPEC §11).

    DATABASE_URL=postgresql://…/bench REDIS_URL=redis://…/4 python -m bench.entitlements [--users 1000]

Starts the web process exactly as the Procfile's ``web:`` line does (gunicorn
with its flags) plus ``python worker.py`` workers, and measures in one run:

* check latency with wrk (GET /api/v1/entitlements/check with a ``check`` key,
  warm cache, users cycling) at several connection counts, side by side with
  /healthz at the same counts: requests/s, p50, p99; and how many database
  transactions ran meanwhile (the hot path should add none);
* freshness: while ~``--rate`` events/s flow through /v1/batch, probe events
  for a user on a plan, each timed from its 200 until a check shows it (p50/p99).

Prints a summary and writes a JSON report to bench/results/.
"""

from __future__ import annotations

import argparse
import os
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
from sqlalchemy import select, text, update

import bench
import config
from bench import RESULTS, write_report
from bench.run import free_port, wrk_figures
from kana import db, migrate
from kana.broker import connect
from kana.domain import keys, plans
from kana.ingest import spool
from kana.models import Event, Feature, User

ROOT = Path(__file__).resolve().parent.parent

CHECK_SCRIPT = """
local ids, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
  wrk.headers["Authorization"] = "Bearer " .. args[2]
  i = math.random(#ids)
end
request = function()
  i = i % #ids + 1
  return wrk.format("GET", "/api/v1/entitlements/check?feature_id=messages&delta=1&user_id=" .. ids[i])
end
"""


def procfile_web() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError("no web: line in the Procfile")


class Stack:
    """The Procfile's web command (through a shell, as a Procfile runner does) and N workers."""

    def __init__(self, env: dict[str, str], workers: int) -> None:
        self.port = free_port()
        web_env = dict(env, PORT=str(self.port), PROMETHEUS_MULTIPROC_DIR=tempfile.mkdtemp(prefix="kana-prom-"))
        self.procs = [subprocess.Popen(["bash", "-c", procfile_web()], cwd=ROOT, env=web_env,
                                       start_new_session=True, stdout=subprocess.DEVNULL)]
        self.procs += [subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                       for _ in range(workers)]
        if bench.wait_healthy(self.url):
            return
        self.stop()
        raise RuntimeError("the web process did not come up")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        import signal

        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wrk(url: str, *, connections: int, seconds: int, script: str | None = None, args: list[str] = ()) -> dict:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url, "--", *args], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw error responses:\n{out}")
    return {"connections": connections, **wrk_figures(out)}


def transactions(dbname: str) -> int:
    with db.get_engine().connect() as conn:
        return conn.execute(text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d"),
                            {"d": dbname}).scalar() or 0


def setup(users: int) -> tuple[int, str, str, str]:
    with db.SessionLocal.begin() as s:
        ws, admin = keys.create_workspace(s, f"bench-ent-{uuid.uuid4().hex[:6]}")
        _, check_key = keys.create_key(s, ws.id, "check")
        _, ingest_key = keys.create_key(s, ws.id, "ingest")
        s.add(Feature(workspace_id=ws.id, id="messages", name="Messages", type="consumable"))
        s.flush()
        plans.create_plan(s, ws.id, {"id": "pro", "name": "Pro", "features": [
            {"feature_id": "messages", "limit": 10**9, "period": "month", "thresholds": [80, 100]}]})
        return ws.id, admin, check_key, ingest_key


def track(user_id: str, delta: int = 1) -> dict:
    return {"type": "track", "userId": user_id, "event": "Message Sent", "messageId": uuid.uuid4().hex,
            "properties": {"featureId": "messages", "delta": delta}}


def stats(url: str, admin: str) -> dict:
    return requests.get(f"{url}/api/v1/stats", headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()


def wait_processed(url: str, admin: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stats(url, admin)["events_pending"] == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("events still pending")


def flow(url: str, key: str, user_ids: list[str], rate: int, stop: threading.Event, sent: list[int]) -> None:
    """~``rate`` events/s as batches of 100 (what Segment sends), paced every 50 ms."""
    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}
    per_tick, tick, i = max(1, rate // 20), 0.05, 0
    next_at = time.monotonic()
    while not stop.is_set():
        calls = [track(user_ids[(i + j) % len(user_ids)]) for j in range(per_tick)]
        i += per_tick
        session.post(f"{url}/v1/batch", json={"batch": calls}, headers=headers, timeout=30).raise_for_status()
        sent[0] += per_tick
        next_at += tick
        time.sleep(max(0.0, next_at - time.monotonic()))


def freshness(url: str, ingest_key: str, check_key: str, user_id: str, seconds: float,
              timeout: float = 10.0, seen: dict[str, float] | None = None) -> list[float]:
    """Probe events one after another for ``seconds``; each timed from its 200 until a check shows it.

    ``seen`` gets each shown probe's messageId → the wall-clock time a check first showed it.
    """
    session = requests.Session()
    check_headers = {"Authorization": f"Bearer {check_key}"}
    params = {"user_id": user_id, "feature_id": "messages", "delta": 0}
    out: list[float] = []
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        before = session.get(f"{url}/api/v1/entitlements/check", params=params, headers=check_headers,
                             timeout=10).json()["used"]
        probe = track(user_id)
        resp = session.post(f"{url}/v1/batch", json={"batch": [probe]},
                            headers={"Authorization": f"Bearer {ingest_key}"}, timeout=10)
        resp.raise_for_status()
        accepted = time.perf_counter()
        while True:
            used = session.get(f"{url}/api/v1/entitlements/check", params=params, headers=check_headers,
                               timeout=10).json()["used"]
            if used > before:
                out.append(time.perf_counter() - accepted)
                if seen is not None:
                    seen[probe["messageId"]] = time.time()
                break
            if time.perf_counter() - accepted > timeout:
                out.append(timeout)  # a timeout, counted at the timeout: a lower bound
                return out  # the workers are behind; more probes would only queue behind them
            time.sleep(0.002)
        time.sleep(0.05)
    return out


def measure_freshness(url: str, admin: str, ingest_key: str, check_key: str, user_ids: list[str], rate: int,
                      seconds: float, redis, partitions: int) -> dict:  # noqa: ANN001
    """Probe events for one user while ``rate`` events/s flow for ``seconds`` (bounded: a backlog the
    workers cannot clear in two minutes afterwards is reported and dropped)."""
    stop, sent = threading.Event(), [0]
    flow_thread = threading.Thread(target=flow, args=(url, ingest_key, user_ids[1:], rate, stop, sent), daemon=True)
    processed_before = stats(url, admin)["events_processed"]
    started = time.perf_counter()
    flow_thread.start()
    time.sleep(2)  # let the flow settle
    try:
        seen: dict[str, float] = {}
        lags = freshness(url, ingest_key, check_key, user_ids[0], seconds, seen=seen)
    finally:
        stop.set()
        flow_thread.join(30)
    elapsed = time.perf_counter() - started
    after = stats(url, admin)
    drained = True
    try:
        wait_processed(url, admin, timeout=120)
    except RuntimeError:
        drained = False
        # The bench's own Redis: drop what the workers could not clear, so the machine is not left busy.
        redis.delete(*[spool.queue_key(p) for p in range(partitions)])
    # From the chunk's transaction (the event row's processed_at, taken inside it) to the
    # first check showing it: the part the entitlement cache adds to the pipeline's queueing.
    with db.SessionLocal() as s:
        stamps = dict(s.execute(select(Event.message_id, Event.processed_at).where(
            Event.message_id.in_(list(seen)))).all()) if seen else {}
    after_commit = [max(0.0, seen[m] - stamps[m].timestamp()) for m in seen if m in stamps]
    result = {
        "rate_asked": rate, "seconds": round(elapsed, 1),
        "events_per_s_offered": sent[0] / elapsed,
        "events_per_s_processed": (after["events_processed"] - processed_before) / elapsed,
        "pending_at_end": after["events_pending"], "backlog_cleared_within_120s": drained,
        "timeouts": sum(1 for x in lags if x >= 10.0), "probes": len(lags),
        "p50_ms": pct(lags, 0.5) * 1000, "p90_ms": pct(lags, 0.9) * 1000, "p99_ms": pct(lags, 0.99) * 1000,
        "max_ms": max(lags) * 1000, "mean_ms": statistics.mean(lags) * 1000, "load": os.getloadavg(),
        "from_chunk_transaction_p50_ms": pct(after_commit, 0.5) * 1000 if after_commit else None,
        "from_chunk_transaction_p99_ms": pct(after_commit, 0.99) * 1000 if after_commit else None,
    }
    f = result
    print(f"freshness at {f['events_per_s_offered']:.0f} events/s offered "
          f"({f['events_per_s_processed']:.0f}/s processed, {f['pending_at_end']} pending at the end): "
          f"p50 {f['p50_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms, max {f['max_ms']:.0f} ms over {f['probes']} "
          f"probes ({f['timeouts']} over 10 s); from the chunk's transaction to the check: "
          f"p50 {f['from_chunk_transaction_p50_ms'] or 0:.0f} ms, p99 {f['from_chunk_transaction_p99_ms'] or 0:.0f} ms",
          flush=True)
    return result


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    ap.add_argument("--connections", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rates", type=int, nargs="+", default=[2000], help="events/s flowing during the probes")
    ap.add_argument("--flow-seconds", type=float, default=30, help="length of each freshness phase")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--smoke", action="store_true", help="a few seconds: tiny sizes")
    args = ap.parse_args(argv)
    if args.smoke:
        args.users, args.seconds, args.connections, args.flow_seconds, args.rates = 50, 2, [4], 5, [200]

    settings = config.load()
    if settings.redis_url is None or not settings.database_url.startswith("postgresql"):
        print("set DATABASE_URL (PostgreSQL) and REDIS_URL", file=sys.stderr)
        return 2
    migrate.upgrade(settings.database_url)
    db.configure(settings.database_url)
    dbname = settings.database_url.rsplit("/", 1)[-1].split("?")[0]
    # The Procfile's gunicorn is the virtualenv's, as under a Procfile runner with it activated.
    env = dict(os.environ, DATABASE_URL=settings.database_url, REDIS_URL=settings.redis_url,
               SECRET_KEY=settings.secret_key, KANA_KEY_CACHE_TTL="60",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    connect(settings).flushdb()
    ws_id, admin, check_key, ingest_key = setup(args.users)
    user_ids = [f"user-{i}" for i in range(args.users)]
    stack = Stack(env, args.workers)
    report: dict = {"when": datetime.now(UTC).isoformat(), "users": args.users, "workers": args.workers,
                    "web": procfile_web(), "cores": os.cpu_count(), "load_before": os.getloadavg()}
    try:
        session = requests.Session()
        for i in range(0, len(user_ids), 100):
            session.post(f"{stack.url}/v1/batch", json={"batch": [track(u, 3) for u in user_ids[i : i + 100]]},
                         headers={"Authorization": f"Bearer {ingest_key}"}, timeout=30).raise_for_status()
        wait_processed(stack.url, admin)
        with db.SessionLocal.begin() as s:
            s.execute(update(User).where(User.workspace_id == ws_id).values(plan_id="pro"))
        connect(settings).flushdb()  # assigned in bulk behind the API's back: start from a cold cache
        headers = {"Authorization": f"Bearer {check_key}"}
        for u in user_ids:  # warm every user once (the misses read PostgreSQL and refill)
            body = session.get(f"{stack.url}/api/v1/entitlements/check",
                               params={"user_id": u, "feature_id": "messages"}, headers=headers, timeout=10).json()
            assert body["access"] and body["used"] == 3, body

        with tempfile.TemporaryDirectory() as tmp:
            script, ids = Path(tmp, "check.lua"), Path(tmp, "ids.txt")
            script.write_text(CHECK_SCRIPT)
            ids.write_text("\n".join(user_ids) + "\n")
            latency = []
            for c in args.connections:
                xacts = transactions(dbname)
                checks = wrk(stack.url + "/api/v1/entitlements/check", connections=c, seconds=args.seconds,
                             script=str(script), args=[str(ids), check_key])
                checks["db_transactions_during_run"] = transactions(dbname) - xacts - 1
                health = wrk(stack.url + "/healthz", connections=c, seconds=args.seconds)
                latency.append({"checks": checks, "healthz": health, "load": os.getloadavg()})
                print(f"c={c}: checks {checks['requests_per_s']:.0f}/s p50 {checks['p50_ms']:.2f} ms "
                      f"p99 {checks['p99_ms']:.2f} ms (db xacts {checks['db_transactions_during_run']}); "
                      f"/healthz {health['requests_per_s']:.0f}/s p50 {health['p50_ms']:.2f} ms "
                      f"p99 {health['p99_ms']:.2f} ms; load {os.getloadavg()[0]:.1f}", flush=True)
        report["latency"] = latency

        report["freshness"] = [measure_freshness(stack.url, admin, ingest_key, check_key, user_ids, rate,
                                                 args.flow_seconds, connect(settings), settings.partitions)
                               for rate in args.rates]
        # Exactness after the run: every user's check equals the ledger.
        with db.SessionLocal() as s:
            ledger = dict(s.execute(text(
                "SELECT u.user_id, sum(g.delta) FROM usage g JOIN users u ON u.kana_id = g.kana_id "
                "WHERE g.workspace_id = :ws GROUP BY u.user_id"), {"ws": ws_id}).all())
        wrong = 0
        for u in user_ids:
            body = session.get(f"{stack.url}/api/v1/entitlements/check",
                               params={"user_id": u, "feature_id": "messages", "delta": 0}, headers=headers,
                               timeout=10).json()
            wrong += body["used"] != int(ledger[u])
        report["checks_differing_from_ledger_after_run"] = wrong
    finally:
        stack.stop()
    best = max((r for r in report["latency"] if r["checks"]["p99_ms"] < 5), key=lambda r: r["checks"]["requests_per_s"],
               default=None)
    report["best_under_5ms_p99"] = best
    print("SUMMARY " + (f"checks: {best['checks']['requests_per_s']:.0f}/s with p99 {best['checks']['p99_ms']:.2f} ms "
                        f"at c={best['checks']['connections']} (/healthz {best['healthz']['requests_per_s']:.0f}/s, "
                        f"p99 {best['healthz']['p99_ms']:.2f} ms)" if best else "checks: no run had p99 < 5 ms")
          + "; freshness " + ", ".join(f"p99 {f['p99_ms']:.0f} ms at {f['events_per_s_offered']:.0f} events/s"
                                       for f in report["freshness"]) + "; "
            f"{report['checks_differing_from_ledger_after_run']} checks differ from the ledger")
    write_report("entitlements", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
