"""Drain jobs at a moderate flow: many small chunks, each with its own RQ job (``KANA_DRAIN_GROUP``).

    DATABASE_URL=postgresql://…/bench REDIS_URL=redis://…/4 python -m bench.drains [--events 4000] [--groups 1 4]

A steady flow of 100-call batches spreads a few calls over each partition, so
the workers run many small chunks and the per-job and per-chunk costs, not
the per-event ones, decide the rate. This pushes the mixed workload 100 calls
at a time through the real receiver (Flask test client) and, after each push,
runs an RQ worker in burst mode over the drain jobs it queued, for each drain
group size in turn (repeated ``--reps`` times, interleaved). Prints events/s
and the number of RQ jobs per group size and writes a JSON report to
bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from datetime import UTC, datetime

from rq import SimpleWorker

import config
import jobs
from app import create_app
from bench import RESULTS, with_redis, write_report
from bench.run import new_workspace, steady_users, workload
from kana import broker


def run(settings: config.Settings, group: int, events: int, users: int, seed: int) -> dict:
    settings = dataclasses.replace(settings, drain_group=group)
    app = create_app(settings)
    runtime = jobs.init(settings)
    runtime.redis.flushdb()
    ws_id, key = new_workspace()
    steady_users(ws_id, users)
    calls = workload(events, users, seed=seed)
    client = app.test_client()
    queue = broker.job_queue(runtime.redis, settings)
    worker = SimpleWorker([queue], connection=runtime.redis)
    draining, jobs_run = 0.0, 0
    for i in range(0, len(calls), 100):
        resp = client.post("/v1/batch", json={"batch": calls[i : i + 100]}, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.get_json()
        jobs_run += queue.count
        started = time.perf_counter()
        worker.work(burst=True, logging_level="WARNING")
        draining += time.perf_counter() - started
    return {"group": group, "events_per_s": len(calls) / draining, "drain_jobs": jobs_run}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    settings = with_redis("bench.drains")
    runs = []
    for rep in range(args.reps):
        for group in args.groups:
            result = run(settings, group, args.events, args.users, seed=rep)
            runs.append(result)
            print(f"group {group}: {result['events_per_s']:.0f} events/s, {result['drain_jobs']} drain jobs",
                  flush=True)
    medians = {g: statistics.median(r["events_per_s"] for r in runs if r["group"] == g) for g in args.groups}
    print("SUMMARY " + ", ".join(f"group {g}: {v:.0f} events/s" for g, v in medians.items()))
    write_report("drains", {"when": datetime.now(UTC).isoformat(), "events": args.events, "users": args.users,
                            "runs": runs, "median_events_per_s": medians, "load": os.getloadavg()}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
