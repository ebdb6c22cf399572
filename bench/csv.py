"""CSV benchmark (SPEC §8): export memory for a million users, import rows per second.

    DATABASE_URL=postgresql://... python -m bench.csv [--export-users 1000000] [--import-rows 100000]

* export: users are loaded with COPY into two workspaces (a tenth of the size,
  and full size); each is exported by a child process that reports its peak
  RSS above its own baseline, so flat memory shows as the same number for both.
* import: a file of new users (user_id, name, email, billing_id) is imported
  (creates), imported again (unchanged), then the workspace's own export with
  every name changed (kana_id-addressed updates), then that file again.

``--repeat N`` runs the four imports N times (a new workspace each time) and
reports each pass's median. Targets: export in constant memory; every import at
5,000 rows/s or more, and creating users at 20,000 rows/s (issue 13). Prints a
summary and writes a JSON report to bench/results/.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

import bench
import config
from bench import write_report
from bench.flags import load_users
from kana import db
from kana.domain import keys
from kana.imports import csvfile

ROOT = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_child(workspace_id: int) -> dict:
    """Run in a child process: export one workspace to /dev/null, report time and peak RSS."""
    db.configure(config.load().database_url)
    with db.SessionLocal() as s:
        # Warm up imports, the connection and the first query before taking the baseline.
        next(iter(csvfile.export_lines(s, workspace_id, chunk=10)))
    baseline = _rss_mb()
    rows = -1
    size = 0
    start = time.perf_counter()
    with db.SessionLocal() as s, open(os.devnull, "w") as sink:
        for piece in csvfile.export_lines(s, workspace_id):
            rows += piece.count("\r\n")
            size += len(piece)
            sink.write(piece)
    seconds = time.perf_counter() - start
    return {"rows": rows, "bytes": size, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(_rss_mb(), 1),
            "growth_mb": round(_rss_mb() - baseline, 1)}


def run_export(workspace_id: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.csv", "--export-child", str(workspace_id)], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_import(workspace_id: int, data: bytes, name: str) -> dict:
    with db.SessionLocal.begin() as s:
        import_id = csvfile.create_import(s, workspace_id, name).id
    start = time.perf_counter()
    summary = csvfile.run_import(db.SessionLocal, import_id, data, actor="bench")
    seconds = time.perf_counter() - start
    assert summary["status"] == "finished" and summary["failed"] == 0, summary
    rows = summary["total"]
    result = {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
              **{k: summary[k] for k in ("created", "updated", "merged", "unchanged")}}
    print(f"{name:>18}: {result}", flush=True)
    return result


def import_passes(tag: str, n: int) -> dict[str, dict]:
    """The four imports into a new workspace: create, the same file again, kana_id-addressed renames, again."""
    with db.SessionLocal.begin() as s:
        ws_id = keys.create_workspace(s, f"bench-csv-import-{tag}", "stripe")[0].id
    lines = ["user_id,name,email,billing_id"] + [
        f"imp-{i},Person {i},person{i}@example.com,cus_imp{i}" for i in range(n)
    ]
    new_file = ("\n".join(lines) + "\n").encode()
    imports = {
        "create": timed_import(ws_id, new_file, "create"),
        "reimport": timed_import(ws_id, new_file, "reimport"),
    }
    with db.SessionLocal() as s:
        exported = "".join(csvfile.export_lines(s, ws_id))
    rows = list(csv.DictReader(io.StringIO(exported)))
    for row in rows:
        row["name"] = row["name"] + " (renamed)"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(csvfile.COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    renamed = out.getvalue().encode()
    imports["update_by_kana_id"] = timed_import(ws_id, renamed, "update_by_kana_id")
    imports["reimport_export"] = timed_import(ws_id, renamed, "reimport_export")
    return imports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export-users", type=int, default=1_000_000)
    parser.add_argument("--import-rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1, help="import passes to take the median of")
    parser.add_argument("--export-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.export_child is not None:
        print(json.dumps(export_child(args.export_child)))
        return 0
    bench.postgres("bench.csv")
    engine = db.get_engine()
    stamp = int(time.time())

    exports = {}
    for n in sorted({max(1, args.export_users // 10), args.export_users}):
        with db.SessionLocal.begin() as s:
            ws_id = keys.create_workspace(s, f"bench-csv-export-{n}-{stamp}")[0].id
        load_users(engine, ws_id, n)
        # As autovacuum would after a bulk load: the planner needs to know the workspace is big.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE users"))
        exports[n] = run_export(ws_id)
        print(f"export {n:>9,} users: {exports[n]}", flush=True)

    runs = [import_passes(f"{stamp}-{i}", args.import_rows) for i in range(args.repeat)]
    imports = {name: {**runs[0][name], "rows_per_s": round(statistics.median(r[name]["rows_per_s"] for r in runs)),
                      "runs_rows_per_s": [r[name]["rows_per_s"] for r in runs]}
               for name in runs[0]}
    for name, result in imports.items():
        print(f"{name:>18}: median {result['rows_per_s']:,} rows/s of {result['runs_rows_per_s']}", flush=True)

    report = {
        "benchmark": "csv",
        "at": datetime.now(UTC).isoformat(),
        "database": engine.url.render_as_string(hide_password=True),
        "cpus": os.cpu_count(),
        "export": {str(k): v for k, v in exports.items()},
        "import": imports,
        "import_target_rows_per_s": 5000,
        "import_met": all(r["rows_per_s"] >= 5000 for r in imports.values()),
        "create_target_rows_per_s": 20000,
        "create_met": imports["create"]["rows_per_s"] >= 20000,
        "load_average": os.getloadavg(),
    }
    write_report("csv", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
