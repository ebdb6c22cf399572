"""Benchmark: retroactive reprocessing of stored unmapped events (SPEC §7).

    DATABASE_URL=postgresql://postgres@127.0.0.1/kana_bench \\
        python -m bench.reprocess [--events 1000000] [--rules 10] [--users 10000] [--chunk 5000] [--writers 2]

Seeds a fresh workspace on PostgreSQL with ``--users`` users and ``--events``
stored unmapped track events (COPY, streamed), ``--rules`` features and
mapping rules (nested dot paths, every operator), then runs
``kana.reprocess.reprocess`` inline and reports events/s, how many mapped, the
resident memory sampled after every chunk (it should stay flat) and the peak
RSS (``resource.getrusage``). A second run checks idempotency (it must map
nothing). Then the database's write floor: the same writes replayed as bare
claim statements on an identically seeded workspace. Prints a summary and
writes a JSON report to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, text

import config
from bench import RESULTS, write_report
from kana import db, migrate
from kana.domain import keys, reprocess, rules
from kana.models import Event, Feature, Rule, Usage, User, Workspace

TIERS = ("free", "team", "pro", "enterprise")
CHANNELS = ("email", "sms", "push", "webhook")


def rule_specs(n: int) -> list[dict]:
    """``n`` rules over event names ``Event 0..``: nested paths and every operator."""
    templates = [
        lambda i: [{"property": "plan.tier", "operator": "equals", "value": "pro"}],
        lambda i: [{"property": "channel.kind", "operator": "in", "value": ["email", "sms"]}],
        lambda i: [{"property": "plan.seats", "operator": "gt", "value": 5}],
        lambda i: [{"property": "plan.tier", "operator": "not_equals", "value": "free"},
                   {"property": "plan.seats", "operator": "lte", "value": 40}],
        lambda i: [{"property": "label", "operator": "contains", "value": "report"}],
        lambda i: [{"property": "channel.kind", "operator": "exists", "value": True}],
        lambda i: [{"property": "amount", "operator": "gte", "value": 1}],
        lambda i: [{"property": "amount", "operator": "lt", "value": 50}],
        lambda i: [],
        lambda i: [{"property": "plan.tier", "operator": "in", "value": ["team", "pro", "enterprise"]},
                   {"property": "channel.kind", "operator": "not_equals", "value": "webhook"}],
    ]
    specs = []
    for i in range(n):
        spec = {"feature_id": f"feature-{i}", "event": f"Event {i}", "conditions": templates[i % len(templates)](i),
                "priority": 10 + i}
        if i % 3 == 0:
            spec["delta_property"] = "amount"
        specs.append(spec)
    return specs


def event_rows(ws_id: int, n: int, rule_count: int, kana_ids: list[int], seed: int = 11) -> Iterator[tuple]:
    """COPY rows: event names spread over the rules' names plus ~15% names no rule knows."""
    rnd = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    names = [f"Event {i}" for i in range(rule_count)]
    now = datetime.now(UTC)
    for i in range(n):
        r = rnd.random()
        name = rnd.choice(names) if r < 0.85 else f"Unknown {rnd.randrange(5)}"
        props = {
            "plan": {"tier": rnd.choice(TIERS), "seats": rnd.randrange(1, 60)},
            "channel": {"kind": rnd.choice(CHANNELS)} if rnd.random() < 0.8 else {},
            "amount": rnd.randrange(0, 100),
            "label": rnd.choice(("monthly report", "export", "Report", "invoice")),
        }
        kana_id = kana_ids[rnd.randrange(len(kana_ids))]
        at = start + timedelta(seconds=i * 17)
        yield (ws_id, f"bench-{i}", "track", name, f"user-{kana_id}", kana_id, at, at,
               json.dumps(props), "unmapped", "no rule matched", now)


def seed(ws_id: int, events: int, rule_count: int, users: int) -> float:
    started = time.perf_counter()
    engine = db.get_engine()
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        with conn.cursor() as cur:
            with cur.copy("COPY users (workspace_id, user_id, source, created_at, updated_at) FROM STDIN") as cp:
                now = datetime.now(UTC)
                for i in range(users):
                    cp.write_row((ws_id, f"bench-user-{i}", "segment", now, now))
            cur.execute("SELECT kana_id FROM users WHERE workspace_id = %s ORDER BY kana_id", (ws_id,))
            kana_ids = [row[0] for row in cur.fetchall()]
            with cur.copy("COPY events (workspace_id, message_id, type, name, user_id, kana_id, timestamp, "
                          "received_at, properties, status, reason, processed_at) FROM STDIN") as cp:
                for row in event_rows(ws_id, events, rule_count, kana_ids):
                    cp.write_row(row)
        conn.commit()
    finally:
        raw.close()
    # What autovacuum would have done to events stored over weeks.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE events"))
        conn.execute(text("VACUUM ANALYZE users"))
    return time.perf_counter() - started


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def new_workspace(rule_count: int, *, with_rules: bool = True) -> int:
    with db.SessionLocal.begin() as s:
        ws, _ = keys.create_workspace(s, f"bench-reprocess-{datetime.now(UTC):%H%M%S%f}")
        for i in range(rule_count):
            s.add(Feature(workspace_id=ws.id, id=f"feature-{i}", name=f"Feature {i}", type="consumable"))
        s.flush()
        for spec in rule_specs(rule_count) if with_rules else ():
            rules.create_rule(s, ws.id, spec)
        return ws.id


def write_floor(ws_id: int, args: argparse.Namespace) -> dict:
    """What PostgreSQL alone takes to write the run's outcome, on fresh rows.

    A second workspace is seeded exactly like the first; the claim statement
    reprocessing runs (events claimed, usage rows, running totals) is replayed
    there over the run's (event, feature, delta) triples, in the run's chunks on
    as many connections, with no reading or mapping in Python. Reprocessing
    cannot go faster than this without fewer writes per mapped event.
    """
    twin = new_workspace(args.rules, with_rules=False)
    try:
        seed(twin, args.events, args.rules, args.users)
        with db.SessionLocal() as s:
            ids = [text("SELECT id FROM events WHERE workspace_id = :ws ORDER BY id")] * 2
            same = dict(zip(s.scalars(ids[0], {"ws": ws_id}), s.scalars(ids[1], {"ws": twin}), strict=True))
            matched = [(same[event_id], feature_id, delta) for event_id, feature_id, delta in s.execute(text(
                "SELECT event_id, feature_id, delta FROM usage WHERE workspace_id = :ws ORDER BY event_id"),
                {"ws": ws_id})]
        pieces = [matched[i : i + args.chunk] for i in range(0, len(matched), args.chunk)]

        def claim(piece: list) -> int:
            with db.SessionLocal.begin() as s:
                return reprocess._claim_postgres(s, twin, piece)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.writers) as pool:
            written = sum(pool.map(claim, pieces))
        seconds = time.perf_counter() - started
    finally:
        cleanup(twin)
    return {"mapped": len(matched), "written": written, "seconds": round(seconds, 2),
            "mapped_per_s": round(len(matched) / seconds), "events_per_s": round(args.events / seconds)}


def cleanup(ws_id: int) -> None:
    with db.SessionLocal.begin() as s:
        for model in (Usage, Event, Rule, Feature, User):
            s.execute(delete(model).where(model.workspace_id == ws_id))
        s.execute(text("DELETE FROM api_keys WHERE workspace_id = :ws"), {"ws": ws_id})
        s.execute(delete(Workspace).where(Workspace.id == ws_id))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--rules", type=int, default=10)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=reprocess.CHUNK)
    ap.add_argument("--writers", type=int, default=reprocess.WRITERS, help="chunks written at once")
    ap.add_argument("--keep", action="store_true", help="keep the seeded workspace (default: delete it)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    settings = config.load()
    if not settings.database_url.startswith("postgresql"):
        print("set DATABASE_URL to the PostgreSQL database to measure (e.g. postgresql://postgres@127.0.0.1/"
              "kana_bench)", file=sys.stderr)
        return 2
    migrate.upgrade(settings.database_url)
    db.configure(settings.database_url)

    ws_id = new_workspace(args.rules)
    print(f"workspace {ws_id}: seeding {args.users} users and {args.events} unmapped events …", flush=True)
    seed_s = seed(ws_id, args.events, args.rules, args.users)
    print(f"seeded in {seed_s:.1f}s", flush=True)

    samples: list[float] = []
    last_print = [0.0]

    def progress(state: reprocess.Progress) -> None:
        samples.append(rss_mb())
        now = time.perf_counter()
        if now - last_print[0] > 5:
            last_print[0] = now
            print(f"  {state.scanned}/{state.total} scanned, {state.mapped} mapped, rss {samples[-1]:.0f} MB",
                  flush=True)

    rss_before = rss_mb()
    peak_before = peak_rss_mb()
    started = time.perf_counter()
    state = reprocess.reprocess(db.SessionLocal, ws_id, progress=progress, chunk=args.chunk, writers=args.writers)
    elapsed = time.perf_counter() - started
    peak_after = peak_rss_mb()

    started = time.perf_counter()
    again = reprocess.reprocess(db.SessionLocal, ws_id, chunk=args.chunk, writers=args.writers)
    rerun_s = time.perf_counter() - started

    with db.SessionLocal() as s:
        usage_rows = s.scalar(select(func.count()).select_from(Usage).where(Usage.workspace_id == ws_id))
        unmapped = reprocess.count_unmapped(s, ws_id)

    report = {
        "when": datetime.now(UTC).isoformat(),
        "database": settings.database_url.split("@")[-1],
        "events": args.events,
        "rules": args.rules,
        "users": args.users,
        "chunk": args.chunk,
        "writers": args.writers,
        "load_average": list(os.getloadavg()),
        "seed_seconds": round(seed_s, 2),
        "reprocess_seconds": round(elapsed, 2),
        "scanned": state.scanned,
        "mapped": state.mapped,
        "events_per_s": round(state.scanned / elapsed),
        "mapped_per_s": round(state.mapped / elapsed),
        "rss_mb": {"before": round(rss_before, 1), "min_during": round(min(samples), 1),
                   "max_during": round(max(samples), 1), "end": round(samples[-1], 1)},
        "peak_rss_mb": {"before_reprocess": round(peak_before, 1), "after_reprocess": round(peak_after, 1)},
        "second_run": {"scanned": again.scanned, "mapped": again.mapped, "seconds": round(rerun_s, 2)},
        "check": {"usage_rows": usage_rows, "left_unmapped": unmapped,
                  "ok": usage_rows == state.mapped and again.mapped == 0
                  and unmapped == args.events - state.mapped},
    }
    # The same events/s measure as the run's: events scanned per second of the database's writes alone.
    report["database_write_floor"] = floor = write_floor(ws_id, args)
    print(f"database write floor: the claim statements alone wrote {floor['written']} usage rows in "
          f"{floor['seconds']}s on {args.writers} connections: {floor['mapped_per_s']} mapped events/s, "
          f"{floor['events_per_s']} events/s as the run counts them", flush=True)
    print(f"SUMMARY reprocessed {state.scanned} events ({state.mapped} mapped) in {elapsed:.1f}s: "
          f"{report['events_per_s']} events/s; RSS {report['rss_mb']['min_during']}–"
          f"{report['rss_mb']['max_during']} MB during the run, peak {report['peak_rss_mb']['after_reprocess']} MB; "
          f"second run mapped {again.mapped} in {rerun_s:.1f}s; check ok={report['check']['ok']}")
    write_report("reprocess", report, args.out)
    if not args.keep:
        cleanup(ws_id)
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
