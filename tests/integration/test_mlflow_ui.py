"""MLflow's UI, as a user sees it, after a tiny pipeline run: headless Chromium against ``mlflow server``.

The pipeline runs once (tiny config, in-process, SQLite under the run); ``mlflow server`` serves that
database on 127.0.0.1; Chromium (Debian's ``chromium`` package: ``apt-get install -y chromium``)
opens the link the pipeline printed. Checks: it lands in the runs table (not the GenAI view), which
lists the pipeline's runs with penni's metric columns; screenshots of the runs table and the chart
view are written to ``$PENNI_UI_SCREENSHOTS`` (default: a temporary directory). The README's
pictures are made by ``PENNI_UI_SCREENSHOTS=docs/img python -m pytest -q tests/integration/test_mlflow_ui.py``.
Skipped only where Chromium is not installed.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _mlflow_server(db_uri: str, log: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (one worker) until the block ends; yields its URL."""
    url = f"http://127.0.0.1:{_free_port()}"
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db_uri, "--host", "127.0.0.1",
            "--port", url.rsplit(":", 1)[1], "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            assert time.monotonic() < deadline, "mlflow server did not answer in 180 s"
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def _chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium (a fresh profile each time) with 90 s of virtual time: the charts load lazily."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--window-size=2000,1000", "--virtual-time-budget=90000", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(the link the pipeline printed, the server's base URL) for one tiny pipeline run."""
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    proc = subprocess.run([sys.executable, "workflows/full_pipeline.py", "--config", "tiny", "--in-process",
                           "--storage", str(tmp / "runs")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    link = re.search(r"http://127\.0\.0\.1:5000(/#/experiments/\S+)", proc.stdout)
    assert link, proc.stdout[-2000:]
    with _mlflow_server(f"sqlite:///{tmp / 'runs' / 'tiny' / 'mlflow.db'}", tmp / "server.log") as url:
        yield url + link.group(1), url


def test_the_printed_link_opens_the_runs_table_with_the_pipelines_runs(ui):
    link, _ = ui
    dom = _chromium("--dump-dom", link).stdout
    assert ">tiny<" in dom  # the pipeline's parent run, by name
    assert re.search(r"<strong>9</strong> matching runs", dom)  # the parent and its 8 stage runs
    for column in ("val/top1", "test/top1", "reduction/dense_macs_pct", "cost/dense_macs"):
        assert column in dom, column
    assert "No data available" not in dom  # not the GenAI view ("Traces: 0 / No data available")


def test_screenshots_of_the_runs_table_and_the_chart_view(ui, tmp_path):
    link, _ = ui
    out = Path(os.environ.get("PENNI_UI_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    for name, url in (("mlflow_runs.png", link), ("mlflow_charts.png", link + "&compareRunsMode=CHART")):
        path = out / name
        path.unlink(missing_ok=True)
        _chromium(f"--screenshot={path}", url)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert path.stat().st_size > 20_000, name  # a rendered page, not a blank one
