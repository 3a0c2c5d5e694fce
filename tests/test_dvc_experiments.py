"""Experiments as a researcher compares them (issue 13), in a real DVC project in a temp
git repo: the committed baseline, a two-experiment sweep through DVC's own queue,
`dvc exp show` (headline metrics only, one command to fit 140 columns), `dvc plots diff`
rendered to HTML with both experiments' data, and one MLflow run per experiment."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from head_explain.graph import STAGES

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    windows=40, window_len=32, max_heads=2, candidates=12, topk=6, random_windows=4,
    explain_examples=2, score_top_examples=1, score_random_examples=1, excerpt_len=8,
    min_cluster_size=2, max_events_per_window=2, explain_max_tokens=24,
)  # fmt: skip
# What `make demo` prints and the README gives: `dvc exp show` in 140 columns.
EXP_SHOW_NARROW = [
    "dvc", "exp", "show", "--no-pager", "--only-changed", "--drop",
    "Created|State|Executor|analysed|explained|failed|paired|pairs_|requests|tokens|tmpl_|shuf_|clause_|added_hard|auc_hard|lift_hard|above|src/|stages/|outputs/",
]  # fmt: skip
EXPS = {"exp-topk5": "topk=5", "exp-topk4": "topk=4"}

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 1800) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def make_project(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the project with tiny params, git + DVC initialised, committed."""
    repo = tmp_path / "proj"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "stages", repo / "stages")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text()) | TINY
    params["llm_cache"] = str(tmp_path / "llm_cache.sqlite")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HEAD_EXPLAIN_PROGRESS": "0",
        # the stages run this checkout's code, whatever the venv's editable install points at
        "PYTHONPATH": str(repo / "src"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
    }  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "config", "core.analytics", "false"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def _wait_for_queue(repo: Path, env: dict, limit_s: float = 1500) -> str:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        status = _run(["dvc", "queue", "status"], repo, env)
        if not any(s in status for s in ("Running", "Queued")):
            return status
        time.sleep(5)
    raise AssertionError(f"queue still busy after {limit_s}s:\n{status}")


def _width(text: str) -> int:
    return max((len(line.rstrip()) for line in text.splitlines()), default=0)


def test_baseline_queue_sweep_exp_show_plots_and_mlflow(tmp_path):
    repo, env = make_project(tmp_path)
    first = _run(["dvc", "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    # the headline and the plot data are in git with dvc.lock: main has numbers
    _run(["git", "add", "-A"], repo, env)
    tracked = _run(["git", "ls-files", "outputs"], repo, env).split()
    assert "outputs/metrics.json" in tracked and "outputs/plot_data/head_scores.csv" in tracked
    assert "outputs/metrics/cache.json" in tracked  # uncached outs: in git, for the queue
    assert not [f for f in tracked if f.endswith((".parquet", ".png"))]
    _run(["git", "commit", "-qm", "baseline run"], repo, env)
    assert "Running stage" not in _run(["dvc", "repro"], repo, env)  # nothing to redo

    for name, setting in EXPS.items():
        _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", setting], repo, env)
    _run(["dvc", "queue", "start", "-j", "2"], repo, env)
    status = _wait_for_queue(repo, env)
    assert "Failed" not in status, status
    for name in EXPS:
        log = _run(["dvc", "queue", "logs", name], repo, env)
        assert "Running stage 'select'" in log and "Running stage 'report'" in log, log[-2000:]
        assert "Running stage 'sample'" not in log and "Running stage 'cache'" not in log

    # dvc exp show: the baseline row and both experiments, headline metrics only
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env))
    revs = {}
    for commit in shown:
        for exp in [commit, *(commit.get("experiments") or [])]:
            for rev in exp.get("revs") or [exp]:
                revs[rev.get("name") or rev.get("rev")] = rev
    assert set(EXPS) <= set(revs), list(revs)
    for name in EXPS:
        files = revs[name]["data"]["metrics"]
        assert set(files) == {"outputs/metrics.json"}  # no per-stage metrics
        headline = files["outputs/metrics.json"]["data"]
        assert headline["analysed"] == 2 and {"lift", "lift_lo", "cost_usd"} <= set(headline)
    wide = {**env, "COLUMNS": "400"}
    plain = _run(["dvc", "exp", "show", "--no-pager"], repo, wide)
    narrow = _run(EXP_SHOW_NARROW, repo, wide)
    print(f"dvc exp show width: default {_width(plain)}, narrow {_width(narrow)}")
    assert _width(narrow) <= 140, narrow
    assert all(name in narrow for name in EXPS) and "lift" in narrow

    # dvc plots diff: one HTML page holding both experiments' data
    _run(["dvc", "plots", "diff", *EXPS, "-o", str(tmp_path / "plots")], repo, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    for title in ("Per-head score", "Score histogram", "Per-layer mean score", "pair-AUC lift"):
        assert title in page, title
    for name in EXPS:
        assert name in page
        sha = revs[name]["rev"]
        data = _run(["git", "show", f"{sha}:outputs/plot_data/head_scores.csv"], repo, env)
        values = [r["score"] for r in csv.DictReader(io.StringIO(data)) if r["score"]]
        assert values and all(v in page or str(float(v)) in page for v in values), values

    # one MLflow run per execution, tagged with its experiment name
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["head-explain"])
    mlflow.set_tracking_uri(None)
    assert len(runs) == 3
    assert set(runs["tags.dvc_exp_name"].dropna()) == set(EXPS)
    assert sorted(runs["params.topk"]) == ["4", "5", "6"]
