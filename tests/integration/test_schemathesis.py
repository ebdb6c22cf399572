"""The admin API against its own OpenAPI document, fuzzed by schemathesis over real HTTP.

Every operation of ``/api/v1/openapi.json`` gets a bounded number of generated
cases (valid and invalid input), sent with an admin key to the app served by a
real threaded server; three checks must hold for every answer: no 5xx
(``not_a_server_error``), a documented status (``status_code_conformance``) and
a body matching the documented schema (``response_schema_conformance``).
The number of generated cases is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"
# Cases per operation and phase: enough to reach every documented answer,
# bounded so the run stays within about a minute on a loaded machine.
MAX_EXAMPLES = int(os.environ.get("KANA_SCHEMATHESIS_EXAMPLES", "25"))
SEED = 20261130
# Fuzzing DELETE /keys/{key_id} revokes whichever keys it hits, the run's own
# admin key among them: it runs last, on its own.
REVOKE = "revokeKey"


def run_schemathesis(base_url: str, admin_key: str, report_dir: Path, *select: str) -> tuple[int, int, str]:
    """Run ``st run`` over the live API; (exit code, generated cases, output). ``select``: filter options."""
    cmd = [
        str(Path(sys.executable).with_name("st")), "run", f"{base_url}/api/v1/openapi.json", "--url", base_url,
        "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
        "--phases", "examples,coverage,fuzzing", "--no-shrink",
        "--header", f"Authorization: Bearer {admin_key}",
        "--report", "ndjson", "--report-dir", str(report_dir), *select,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"})
    return proc.returncode, count_cases(report_dir), proc.stdout + proc.stderr


def count_cases(report_dir: Path) -> int:
    """Test cases schemathesis generated and sent, from its NDJSON event log."""
    total = 0
    for path in report_dir.glob("*.ndjson"):
        for line in path.read_text().splitlines():
            finished = json.loads(line).get("ScenarioFinished")
            if finished:
                total += len(finished.get("recorder", {}).get("cases", {}))
    return total


def test_api_conforms_to_its_openapi_document(live_server, workspace, tmp_path, capsys):
    code, cases, output = run_schemathesis(live_server, workspace.key, tmp_path / "all",
                                           "--exclude-operation-id", REVOKE)
    assert code == 0, output[-20000:]
    assert "Authentication failed" not in output, output[-5000:]
    revoke_code, revoke_cases, output = run_schemathesis(live_server, workspace.key, tmp_path / "revoke",
                                                         "--include-operation-id", REVOKE)
    with capsys.disabled():  # the count shows in every run, not only with -s
        print(f"\nschemathesis: {cases + revoke_cases} generated cases over /api/v1/openapi.json "
              f"({revoke_cases} of them {REVOKE}), exit codes {code}/{revoke_code}")
    assert revoke_code == 0, output[-20000:]
    assert cases > 500
