"""``kana dev``: the whole stack on one machine, embedded SQLite and Redis by default."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
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


DEV_EMAIL = "dev@example.com"


@dataclass(frozen=True)
class DevAccess:
    key: str
    email: str
    password: str


def _dev_access(settings: Settings) -> DevAccess:
    """The 'dev' workspace (made on first run), a fresh admin API key, and a dashboard admin.

    The admin's password is made on first run and kept in ``$KANA_DATA_DIR/dev_admin_password``
    (this is a development stack), so every banner can print a working login.
    """
    from sqlalchemy import select

    from kana import db
    from kana.domain import accounts, keys
    from kana.models import DashboardAdmin, Workspace

    db.configure(settings.database_url)
    secret = Path(settings.data_dir) / "dev_admin_password"
    with db.SessionLocal.begin() as s:
        ws = s.scalar(select(Workspace).where(Workspace.name == "dev").order_by(Workspace.id))
        if ws is None:
            ws, key = keys.create_workspace(s, "dev")
        else:
            _, key = keys.create_key(s, ws.id, "admin", name="kana dev")
        admin = s.scalar(select(DashboardAdmin).where(DashboardAdmin.workspace_id == ws.id,
                                                      DashboardAdmin.email == DEV_EMAIL))
        if admin is None or not secret.exists():
            password = secrets.token_urlsafe(12)
            if admin is None:
                accounts.create_admin(s, ws.id, DEV_EMAIL, password)
            else:
                accounts.set_password(s, admin, password)
            secret.write_text(password)
            secret.chmod(0o600)
    return DevAccess(key, DEV_EMAIL, secret.read_text().strip())


def banner(url: str, database_url: str, redis_url: str, access: DevAccess) -> str:
    """What ``kana dev`` prints once the web answers: where things are and calls to paste."""
    key = access.key
    json_post = f"-H 'Content-Type: application/json' {url}"
    return (
        f"\nKana is running at {url}\n"
        f"  dashboard: {url}/dashboard/  (log in as {access.email} / {access.password})\n"
        f"  database:  {database_url}\n  redis:     {redis_url}\n"
        f"  admin API key (workspace 'dev'): {key}\n\nTry:\n"
        f"  # a feature to count usage against (409 if it exists already)\n"
        f"  curl -s -H 'Authorization: Bearer {key}' {json_post}/api/v1/features \\\n"
        f"    -d '{{\"id\": \"messages\", \"name\": \"Messages\"}}'\n"
        f"  # a track call that records 1 unit of usage of it\n"
        f"  curl -s -u '{key}:' {json_post}/v1/track \\\n"
        f"    -d '{{\"userId\": \"user-1\", \"event\": \"Message Sent\", "
        f"\"properties\": {{\"featureId\": \"messages\", \"delta\": 1}}}}'\n"
        f"  # usage so far\n"
        f"  curl -s -H 'Authorization: Bearer {key}' '{url}/api/v1/usage?feature=messages'\n"
        f"\nCtrl-C stops everything.\n"
    )


def run(settings: Settings, *, port: int = 8000, workers: int = 2, verbose: bool = False) -> int:
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
    access = _dev_access(settings)

    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=redis_url,
        KANA_DATA_DIR=str(data_dir),
        SECRET_KEY=os.environ.get("SECRET_KEY") or _secret(data_dir),
        # Webhooks to a local receiver are what one tries on a development machine.
        KANA_WEBHOOK_ALLOW_PRIVATE="1",
        # Routine jobs (the recover scan every 30 s, each drain) log at INFO: shown with --verbose.
        KANA_LOG_LEVEL=os.environ.get("KANA_LOG_LEVEL") or ("INFO" if verbose else "WARNING"),
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
        "scheduler": [py, "-m", "kana.scheduler"],
        **{f"worker.{i + 1}": [py, "-m", "worker"] for i in range(workers)},
    }

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen(commands[name], env=web_env if name == "web" else env)

    procs = {name: start(name) for name in commands}
    started = {name: time.monotonic() for name in commands}
    quick_deaths = dict.fromkeys(commands, 0)
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
        print(banner(url, settings.database_url, redis_url, access), flush=True)
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is None or stopping:
                    continue
                # A child that dies right after each start (a port in use, a broken install) is not
                # restarted forever: the third quick death in a row stops the stack.
                quick_deaths[name] = quick_deaths[name] + 1 if time.monotonic() - started[name] < 5 else 1
                if quick_deaths[name] >= 3:
                    print(f"kana dev: {name} keeps exiting (code {proc.returncode}); stopping", file=sys.stderr)
                    return 1
                print(f"kana dev: {name} exited with code {proc.returncode}; restarting it", file=sys.stderr,
                      flush=True)
                procs[name], started[name] = start(name), time.monotonic()
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
