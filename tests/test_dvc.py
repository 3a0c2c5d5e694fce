"""DVC wiring: dvc.yaml matches the pipeline, and real `dvc repro` / `dvc exp run -S`
in a temp git repo rerun exactly the stages whose params changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from head_explain.pipeline import OUTPUTS, STAGE_PARAMS, STAGES

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    windows=40, window_len=32, max_heads=3, candidates=16, topk=8, random_windows=6,
    explain_examples=3, score_top_examples=1, score_random_examples=1, excerpt_len=8,
    min_cluster_size=2, max_events_per_window=2,
)  # fmt: skip


def test_dvc_yaml_lists_each_stage_params_and_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, st in stages.items():
        assert st["params"] == STAGE_PARAMS[name], name
        outs = [o if isinstance(o, str) else next(iter(o)) for o in st["outs"]]
        for o in OUTPUTS[name]:
            if o != "metrics.json":
                assert f"${{outdir}}/{o}" in outs, (name, o)
        assert Path(REPO / st["cmd"].split()[-1]).exists()
        # per-stage metrics are plain uncached outputs; the headline is the one metric
        assert {f"${{outdir}}/metrics/{name}.json": {"cache": False}} in st["outs"]
        assert ("metrics" in st) == (name == "report")
    assert stages["report"]["metrics"] == [{"${outdir}/metrics.json": {"cache": False}}]
    # select and later stages never read the params that sample and cache read
    assert "topk" not in STAGE_PARAMS["sample"] + STAGE_PARAMS["cache"]


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.mark.slow
def test_repro_then_exp_run_reruns_only_select_onwards(tmp_path):
    repo = tmp_path / "proj"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "stages", repo / "stages")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text()) | TINY
    params["llm_cache"] = str(tmp_path / "llm_cache.sqlite")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n__pycache__/\n")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HEAD_EXPLAIN_PROGRESS": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["dvc", "config", "core.analytics", "false"], repo, env)
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "init"], repo, env)

    first = _run(["dvc", "repro"], repo, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    for name in (
        "windows.parquet",
        "events.parquet",
        "scores.parquet",
        "clusters.json",
        "report.md",
    ):
        assert (repo / "outputs" / name).exists()
    _run([*git, "add", "-A"], repo, env)
    _run([*git, "commit", "-qm", "first run"], repo, env)

    again = _run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again  # a second repro does nothing

    exp = _run(["dvc", "exp", "run", "-S", "topk=6"], repo, env)
    assert "Running stage 'sample'" not in exp and "Running stage 'cache'" not in exp
    for stage in ("select", "explain", "simulate", "cluster", "report"):
        assert f"Running stage '{stage}'" in exp, stage
    show = _run(["dvc", "exp", "show", "--json"], repo, env)
    assert "mean_score" in show

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["head-explain"])
    assert len(runs) == 2  # one per pipeline execution, comparable in the UI
    assert set(runs["params.topk"]) == {"8", "6"}
