"""The README's cluster path: ``ray start --head`` then ``ray job submit --working-dir .``.

A private head node (its own ports and temp dir, so it neither joins nor is joined by any other
Ray on this machine) with token authentication on, as the README tells users to run it::

    ray get-auth-token --generate      # once; writes ~/.ray/auth_token if there is none
    export RAY_AUTH_MODE=token
    ray start --head
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python workflows/full_pipeline.py ...

The test keeps its token in a file of its own (``RAY_AUTH_TOKEN_PATH``) instead of
``~/.ray/auth_token``. It stops only the processes of the head it started (``ray stop`` would
kill every Ray process on the machine).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.stages.table import STAGES

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(900)

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:  # ephemeral range: clear of Ray's worker ports 10002-19999
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM the blocking ``ray start`` (it shuts its node down), then SIGKILL what is left of it."""
    tree = _children(head.pid)
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in tree:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def ray_head(tmp_path):
    """A private ``ray start --head --block`` with token auth; yields (dashboard URL, env, temp dir)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="penni-rj-", dir="/tmp"))  # Unix socket paths must stay short
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k in (
        "RAY_USAGE_STATS_ENABLED", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    dashboard_port = _free_port()
    log = open(temp_dir / "ray_start.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--num-cpus", "4", "--temp-dir", str(temp_dir),
         "--port", str(_free_port()), "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
         "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
         "--object-store-memory", str(300 * 1024 * 1024)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start exited:\n" + (temp_dir / "ray_start.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the dashboard is up
                break
            except OSError:
                assert time.monotonic() < deadline, "dashboard did not come up:\n" + (
                    temp_dir / "ray_start.log").read_text()[-4000:]
                time.sleep(0.5)
        yield url, env, temp_dir
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_cli(env: dict, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit_runs_the_pipeline(ray_head, tmp_path):
    url, env, temp_dir = ray_head
    storage = tmp_path / "storage"
    job_id = f"jobtest-{secrets.token_hex(4)}"

    # without the token (auth mode unset, no RAY_AUTH_TOKEN_PATH) the cluster refuses the job
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = _ray_cli(no_token, "job", "list", "--address", url, timeout=120)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower(), refused

    submitted = _ray_cli(
        env, "job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", str(REPO_ROOT),
        "--", "python", "workflows/full_pipeline.py", "--config", "tiny", "--storage", str(storage),
        "--run-name", "jobtest", timeout=720)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-6000:]
    assert f"Job '{job_id}' succeeded" in output, output[-6000:]

    status = _ray_cli(env, "job", "status", "--address", url, job_id, timeout=120)
    assert f"Job '{job_id}' succeeded" in status.stdout + status.stderr, status
    logs = _ray_cli(env, "job", "logs", "--address", url, job_id, timeout=120).stdout
    for stage in STAGES:  # the driver's console reached the job's log: one line per stage, Ray's own output off
        assert sum(line.startswith(f"[{stage}] done in ") for line in logs.splitlines()) == 1, (stage, logs[-4000:])
    assert "[baseline] epoch 1/1 " in logs and "Reporting training result" not in logs, logs[-4000:]
    assert "Baseline vs compressed (test split" in logs
    assert "Total wall time:" in logs

    root = storage / "jobtest"
    for stage in STAGES:
        manifest = json.loads((root / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["fingerprint"], manifest
    assert (root / "report" / "summary.md").stat().st_size > 0

    # what --working-dir uploaded: the sources, not .git nor anything .gitignore'd
    packages = {p.resolve() for p in temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()}
    assert len(packages) == 1, packages
    uploaded = packages.pop()
    assert (uploaded / "pipeline" / "cli" / "runner.py").is_file() and (uploaded / "penni" / "conv.py").is_file()
    names = {p.name for p in uploaded.rglob("*")}
    assert not names & {".git", "__pycache__", ".pytest_cache", "penni_runs", "mlruns", "mlflow.db"}, names
    size = sum(p.stat().st_size for p in uploaded.rglob("*") if p.is_file())
    assert size < 5 * 1024 * 1024, f"working_dir upload is {size / 2**20:.1f} MiB"
