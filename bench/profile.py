"""Where a worker's time goes: the benchmark's workload, drained in-process under cProfile.

    python -m bench.profile [--events 20000] [--users 2000] [--top 25] [--plan]

Needs DATABASE_URL and REDIS_URL (PostgreSQL and Redis, as for bench.run). The
calls go through the real receiver (Flask test client) into Redis, then every
partition is drained by the real drain job in this process, under cProfile.
Prints the top entries by own time and by cumulative time and writes them,
with the throughput, to a JSON report under bench/results/.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from datetime import UTC, datetime

from sqlalchemy import update

import jobs
from app import create_app
from bench import RESULTS, with_redis, write_report
from bench.run import ROOT, new_workspace, steady_users, stored, workload
from jobs import events as event_jobs
from kana import db
from kana.domain import plans
from kana.ingest import spool
from kana.models import User


def top(stats: pstats.Stats, key: str, n: int) -> list[dict]:
    stats.sort_stats(key)
    rows = []
    for func in stats.fcn_list[:n]:  # type: ignore[attr-defined]
        calls, _, own, cumulative, _ = stats.stats[func]  # type: ignore[attr-defined]
        filename, line, name = func
        where = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        rows.append({"function": f"{where}:{line}({name})", "calls": calls, "own_s": round(own, 3),
                     "cumulative_s": round(cumulative, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--users", type=int, default=2000, help="users created before the clock starts")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--plan", action="store_true",
                    help="every user on a plan limiting messages with alert thresholds (the entitlement work)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    settings = with_redis("bench.profile")
    app = create_app(settings)
    runtime = jobs.init(settings)
    runtime.redis.flushdb()
    ws_id, key = new_workspace()
    steady_users(ws_id, args.users)
    if args.plan:
        with db.SessionLocal.begin() as s:
            plans.create_plan(s, ws_id, {"id": "pro", "name": "Pro", "features": [
                {"feature_id": "messages", "limit": 10**9, "period": "month", "thresholds": [80, 100]}]})
            s.execute(update(User).where(User.workspace_id == ws_id).values(plan_id="pro"))
    calls = workload(args.events, args.users)
    client = app.test_client()
    for i in range(0, len(calls), 100):
        resp = client.post("/v1/batch", json={"batch": calls[i : i + 100]}, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.get_json()

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    while spool.depth(runtime.redis, settings.partitions):
        for p in range(settings.partitions):
            event_jobs.drain(p)
    profiler.disable()
    elapsed = time.perf_counter() - start
    assert stored(ws_id) == len(calls)

    stats = pstats.Stats(profiler)
    report = {
        "when": datetime.now(UTC).isoformat(),
        "events": len(calls),
        "users_on_a_plan": args.plan,
        "database": db.get_engine().url.render_as_string(hide_password=True).split("@")[-1],
        "events_per_s_under_profiler": len(calls) / elapsed,
        "top_own": top(stats, "tottime", args.top),
        "top_cumulative": top(stats, "cumulative", args.top),
    }
    print(f"{len(calls)} events drained in {elapsed:.1f} s under cProfile "
          f"({report['events_per_s_under_profiler']:.0f} events/s, one process)")
    for title, key_name in (("own time", "top_own"), ("cumulative", "top_cumulative")):
        print(f"\ntop {args.top} by {title}:")
        for row in report[key_name]:
            print(f"  {row['own_s']:8.3f} {row['cumulative_s']:8.3f} {row['calls']:>9}  {row['function']}")
    write_report("profile", report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
