"""The MLflow UI, in real headless Chromium, over a run logged to a real SQLite store:
the run page lists per-head metrics, the artifact view shows the heads table with the
explanations (a `<script>` in one of them stays text)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from head_explain import config
from head_explain.runners.report import write_report
from head_explain.tracking import log_run

sys.path.insert(0, str(Path(__file__).parent))
from test_report import write_artifacts  # noqa: E402
from test_tracking import write_llm_calls  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SERVER_WAIT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dump_dom(url: str, tmp: Path, needle: str, tries: int = 3) -> str:
    """The page's DOM once the SPA has rendered `needle`: virtual time stands still
    while fetches are pending, but on a loaded machine a lazy view can still miss the
    budget, so the dump is retried (bounded) with a longer budget and a fresh profile."""
    dom = ""
    for attempt in range(tries):
        res = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp / f'chrome-{needle[:8]}-{attempt}'}",
             f"--virtual-time-budget={20000 * (attempt + 1)}", "--dump-dom", url],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-2000:]
        dom = res.stdout
        if needle in dom:
            break
    return dom


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("mlflow_ui")
    out = tmp / "outputs"
    write_artifacts(out)
    write_llm_calls(out)
    cfg = config.build({"outdir": str(out), "mlflow_experiment": "ui-exp"})
    metrics = write_report(cfg)
    db = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", db)
        run_id = log_run(cfg, out, metrics)
    import json

    exp_id = json.loads((out / "mlflow_run.json").read_text())["experiment_id"]
    port = _free_port()
    env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", db,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + SERVER_WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.time() < deadline, f"mlflow server not up in {SERVER_WAIT_S}s"
            time.sleep(1)
        run_url = f"{base}/#/experiments/{exp_id}/runs/{run_id}"
        yield {
            "run_page": _dump_dom(run_url, tmp, "score/L2H0"),
            "table_page": _dump_dom(
                f"{run_url}/artifacts/heads_table.json", tmp, "explanation 1 about commas"
            ),
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_run_page_lists_per_head_metrics(ui):
    dom = ui["run_page"]
    assert "score/L2H0" in dom and "layer_mean/L0" in dom
    assert "lift" in dom  # the headline's paired lift


def test_artifact_view_shows_heads_table(ui):
    dom = ui["table_page"]
    assert "heads_table.json" in dom
    # the first rows (a long table may be virtualised): explanation, scores, head name
    assert "explanation 1 about commas" in dom and "baseline_score" in dom and "L0H1" in dom
    assert "&lt;script&gt;alert(1)" in dom and "<script>alert(1)" not in dom
