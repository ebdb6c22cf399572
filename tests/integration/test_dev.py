"""``kana dev`` as a newcomer meets it: a real subprocess on a free port with its own data directory.

Its banner's calls are run as printed (with curl), its dashboard login is used,
routine jobs stay out of the console unless --verbose, and a child that dies is restarted.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT
from tests.helpers import wait_until
from tests.integration.test_faults import free_port

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="runs the banner's curl calls")


class Dev:
    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "PROMETHEUS_MULTIPROC_DIR")}
        # The recover scan every 2 s instead of 30: routine output would show within the test.
        env.update(KANA_DATA_DIR=str(data_dir), KANA_RECOVER_INTERVAL="2")
        env.pop("KANA_LOG_LEVEL", None)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from kana.cli import main; main()", "dev", "--port", str(self.port), *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def banner(self) -> str:
        wait_until(lambda: "Ctrl-C stops everything." in self.output or self.proc.poll() is not None,
                   timeout=120, interval=0.2)
        out = self.output
        assert "Ctrl-C stops everything." in out, out
        return out[out.index("Kana is running at"):out.index("Ctrl-C stops everything.")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def dev(tmp_path) -> Iterator:
    running: list[Dev] = []

    def start(*args: str) -> Dev:
        d = Dev(tmp_path / "var", *args)
        running.append(d)
        return d

    yield start
    for d in running:
        d.stop()


def curl_calls(banner: str) -> list[str]:
    """The banner's curl commands, continuation lines joined."""
    return [call.strip() for call in re.findall(r"^  (curl .*?)(?<!\\)$", banner.replace("\\\n", ""), re.MULTILINE)]


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_dev_banner_calls_count_usage_and_its_login_works(dev):
    d = dev()
    banner = d.banner()
    url = re.search(r"Kana is running at (\S+)", banner).group(1)
    email, password = re.search(r"log in as (\S+) / (\S+)\)", banner).groups()
    create, track, usage = curl_calls(banner)
    assert "/api/v1/features" in create and "/v1/track" in track and "/api/v1/usage" in usage

    created = subprocess.run(["bash", "-c", create], capture_output=True, text=True, check=True).stdout
    assert '"id":"messages"' in created.replace(" ", ""), created
    tracked = subprocess.run(["bash", "-c", track], capture_output=True, text=True, check=True).stdout
    assert '"success":true' in tracked.replace(" ", ""), tracked

    def total() -> str | None:
        out = subprocess.run(["bash", "-c", usage], capture_output=True, text=True, check=True).stdout
        match = re.search(r'"total":\s*"?([0-9.]+)', out)
        return match.group(1) if match and float(match.group(1)) > 0 else None

    assert float(wait_until(total, timeout=60, interval=0.5)) == 1

    web = requests.Session()
    page = web.get(f"{url}/dashboard/login", timeout=10).text
    token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page).group(1)
    res = web.post(f"{url}/dashboard/login", data={"email": email, "password": password, "csrf_token": token},
                   timeout=10, allow_redirects=False)
    assert res.status_code in (302, 303), res.text
    assert web.get(f"{url}/dashboard/", timeout=10, allow_redirects=False).status_code == 200

    # The scheduler has run its recover scan a few times by now; quiet by default.
    time.sleep(5)
    assert "recover" not in d.output

    # A child that dies is restarted, and the console says so.
    worker = next(pid for pid in children(d.proc.pid)
                  if Path(f"/proc/{pid}/cmdline").read_bytes().endswith(b"-m\x00worker\x00"))
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: "worker.1 exited with code -9; restarting it" in d.output
               or "worker.2 exited with code -9; restarting it" in d.output, timeout=10)
    d.stop()

    # Second run, same data directory: the same login still works, and --verbose shows routine jobs.
    again = dev("--verbose")
    assert f"log in as {email} / {password})" in again.banner()
    wait_until(lambda: "recover" in again.output, timeout=30)
