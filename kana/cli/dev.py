"""``kana dev``: the whole stack on one machine, embedded SQLite and Redis by default."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from config import Settings


def _wait_healthy(url: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:  # noqa: S310 - our own server
                if resp.status == 200:
                    return True
        except OSError:
            time.sleep(0.2)
    return False


def _secret(data_dir: Path) -> str:
    path = data_dir / "secret_key"
    if not path.exists():
        path.write_text(os.urandom(32).hex())
        path.chmod(0o600)
    return path.read_text().strip()


def _dev_key(settings: Settings) -> str:
    from sqlalchemy import select

    from kana import db
    from kana.domain import keys
    from kana.models import Workspace

    db.configure(settings.database_url)
    with db.SessionLocal.begin() as s:
        ws = s.scalar(select(Workspace).where(Workspace.name == "dev").order_by(Workspace.id))
        if ws is None:
            _, key = keys.create_workspace(s, "dev")
        else:
            _, key = keys.create_key(s, ws.id, "admin", name="kana dev")
    return key


def run(settings: Settings, *, port: int = 8000, workers: int = 2) -> int:
    from kana import broker, migrate

    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    embedded = None
    redis_url = settings.redis_url
    if redis_url is None:
        # AOF with fsync on every write: an accepted call survives a crash of this Redis too.
        embedded = broker.embedded_redis(data_dir, appendonly=True)
        redis_url = broker.embedded_url(embedded)
    migrate.upgrade(settings.database_url)
    key = _dev_key(settings)

    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=redis_url,
        KANA_DATA_DIR=str(data_dir),
        SECRET_KEY=os.environ.get("SECRET_KEY") or _secret(data_dir),
    )
    # gunicorn runs two processes: /metrics must sum both (prometheus_client's
    # multiprocess mode), from a directory emptied at every start.
    metrics_dir = data_dir / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    web_env = dict(env, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    py = sys.executable
    commands = {
        "web": [py, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                "--threads", "4", "--access-logfile", "-"],
        "scheduler": [str(Path(py).parent / "rq"), "cron", "config.cron", "--url", redis_url],
        **{f"worker.{i + 1}": [py, "-m", "worker"] for i in range(workers)},
    }
    procs = {name: subprocess.Popen(cmd, env=web_env if name == "web" else env) for name, cmd in commands.items()}
    url = f"http://127.0.0.1:{port}"
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        if not _wait_healthy(url):
            print("web process did not become healthy; see the output above", file=sys.stderr)
            return 1
        print(
            f"\nKana is running at {url}\n"
            f"  database: {settings.database_url}\n  redis:    {redis_url}\n"
            f"  admin API key (workspace 'dev'): {key}\n\nTry:\n"
            f"  curl -s -u '{key}:' -H 'Content-Type: application/json' {url}/v1/track \\\n"
            f"    -d '{{\"userId\": \"user-1\", \"event\": \"Message Sent\", \"properties\": {{\"delta\": 1}}}}'\n"
            f"  curl -s -H 'Authorization: Bearer {key}' {url}/api/v1/users\n\nCtrl-C stops everything.\n",
            flush=True,
        )
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.5)
        return 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if embedded is not None:
            embedded.shutdown(save=True)
