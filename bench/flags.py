"""Flag refresh benchmark (SPEC §6): a million users on PostgreSQL, refreshed in under 10 s.

    DATABASE_URL=postgresql://... python -m bench.flags [--users 1000000] [--other 200000]

Loads ``--users`` users into a fresh workspace with COPY (30% without a billing
id, 10% in shared-email pairs, 1% in groups of about four) plus ``--other``
users in a second workspace (multi-tenant tables), then times, each as one
committed transaction:

* cold: the first refresh (every flag row inserted);
* steady: a refresh with nothing changed (the five-minute case);
* churn: after 1% of the users changed (billing ids set, emails moved);
* worst: after every user lost their billing id (a million flag rows to add).

Prints a summary and writes a JSON report to bench/results/.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from datetime import UTC, datetime

from sqlalchemy import text

import bench
from bench import write_report
from kana import db
from kana.domain import flags, keys
from kana.models import FlagRefresh


def load_users(engine, workspace_id: int, n: int, seed: int = 11) -> None:  # noqa: ANN001
    """COPY ``n`` users in: emails unique except 10% in pairs and 1% in groups of about four."""
    rnd = random.Random(seed)
    now = datetime.now(UTC).isoformat()
    buf = io.StringIO()
    for i in range(n):
        if i % 20 < 2:
            email = f"pair{i // 20}@example.com"
        elif i % 100 == 2:
            email = f"group{rnd.randrange(max(1, n // 400))}@example.com"
        else:
            email = f"user{i}@example.com"
        null = "\\N"  # COPY's NULL
        has_billing = rnd.random() >= 0.30
        billing, provider = (f"cus_{workspace_id}x{i}", "stripe") if has_billing else (null, null)
        user_id = f"u{i}" if rnd.random() < 0.9 else null
        buf.write(f"{workspace_id}\t{user_id}\t{email}\t{email.lower()}\tUser {i}\t{billing}\t{provider}\t"
                  f"segment\t{now}\t{now}\n")
    raw = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            with cur.copy("COPY users (workspace_id, user_id, email, email_key, name, billing_id, billing_provider, "
                          "source, created_at, updated_at) FROM STDIN") as copy:
                copy.write(buf.getvalue())
        raw.commit()
    finally:
        raw.close()


def timed_refresh(workspace_id: int) -> tuple[float, dict]:
    start = time.perf_counter()
    with db.SessionLocal.begin() as s:
        counts = flags.refresh(s, workspace_id)
    return time.perf_counter() - start, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--other", type=int, default=200_000, help="users of a second workspace")
    args = parser.parse_args(argv)
    bench.postgres("bench.flags")
    engine = db.get_engine()
    with db.SessionLocal.begin() as s:
        ws, _ = keys.create_workspace(s, f"bench-flags-{int(time.time())}")
        other, _ = keys.create_workspace(s, "bench-flags-neighbour")
        ws_id, other_id = ws.id, other.id
    t0 = time.perf_counter()
    load_users(engine, ws_id, args.users)
    load_users(engine, other_id, args.other, seed=12)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE users"))
    load_s = time.perf_counter() - t0
    print(f"loaded {args.users:,} + {args.other:,} users in {load_s:.1f}s", flush=True)

    results: dict[str, dict] = {}

    def record(name: str) -> None:
        seconds, counts = timed_refresh(ws_id)
        results[name] = {"seconds": round(seconds, 3), "missing_billing_id": counts["missing_billing_id"],
                         "duplicate_email": counts["duplicate_email"],
                         "duplicate_groups": counts["duplicate_groups"]}
        print(f"{name:>8}: {seconds:6.2f}s  {results[name]}", flush=True)

    record("cold")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE user_flags"))
    record("steady")
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET billing_id = 'cus_fixed' || kana_id WHERE workspace_id = :ws "
                          "AND billing_id IS NULL AND kana_id % 200 = 0"), {"ws": ws_id})
        conn.execute(text("UPDATE users SET email = 'moved' || kana_id || '@example.com', "
                          "email_key = 'moved' || kana_id || '@example.com' WHERE workspace_id = :ws "
                          "AND kana_id % 200 = 1"), {"ws": ws_id})
    record("churn")
    with engine.begin() as conn:
        conn.execute(text("UPDATE users SET billing_id = NULL WHERE workspace_id = :ws"), {"ws": ws_id})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE users"))
    record("worst")

    with db.SessionLocal() as s:
        refreshed = s.get(FlagRefresh, ws_id)
        assert refreshed is not None and refreshed.missing_billing_id == args.users
    report = {
        "benchmark": "flags.refresh",
        "at": datetime.now(UTC).isoformat(),
        "database": engine.url.render_as_string(hide_password=True),
        "server_version": engine.dialect.server_version_info,
        "cpus": os.cpu_count(),
        "users": args.users,
        "other_workspace_users": args.other,
        "load_seconds": round(load_s, 1),
        "refresh": results,
        "target_seconds": 10,
        "met": all(r["seconds"] < 10 for r in results.values()),
    }
    write_report("flags", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
