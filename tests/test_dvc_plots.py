"""`dvc exp show` and `dvc plots diff` over real DVC experiments (issue 13), fast: the
report stage's outputs from synthetic artifacts, saved as two experiments with
`dvc exp save` (the full pipeline through the queue: tests/test_dvc_experiments.py)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from head_explain import config
from head_explain.artifacts import read_parquet, write_parquet
from head_explain.runners.report import write_report

sys.path.insert(0, str(Path(__file__).parent))
from test_dvc_experiments import EXP_SHOW_NARROW  # noqa: E402
from test_report import write_artifacts  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EXPS = {"exp-a": 0.05, "exp-b": 0.1}


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def _report(outdir: Path, shift: float) -> None:
    """The report stage's real outputs, every score shifted by `shift`."""
    for name in ("head_types.parquet", "evidence.parquet"):  # optional report inputs:
        if (outdir / name).exists() and (outdir / name).stat().st_size < 8:
            (outdir / name).unlink()  # a placeholder below is not one of them
    write_artifacts(outdir)
    sc, meta = read_parquet(outdir / "scores.parquet")
    sc["score"] = sc["score"] + shift
    write_parquet(outdir / "scores.parquet", sc, meta)
    write_report(config.build({"outdir": str(outdir)}))


def _placeholders(repo: Path) -> None:
    """The other stages' outputs, so `dvc exp save` can record every stage."""
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for o in stage.get("outs", []):
            path = repo / str(o if isinstance(o, str) else next(iter(o))).replace(
                "${outdir}", "outputs"
            )
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")


def _width(text: str) -> int:
    return max((len(line.rstrip()) for line in text.splitlines()), default=0)


def test_exp_show_headline_and_plots_diff_of_two_experiments(tmp_path):
    repo = tmp_path / "proj"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "stages", repo / "stages")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env = {
        **os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t", "COLUMNS": "400",
    }  # fmt: skip
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    out = repo / "outputs"
    _report(out, 0.0)
    _placeholders(repo)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "baseline"], repo, env)
    assert "outputs/metrics.json" in _run(["git", "ls-files", "outputs"], repo, env)
    for name, shift in EXPS.items():
        _report(out, shift)
        _placeholders(repo)
        _run(["dvc", "exp", "save", "-n", name], repo, env)

    shown = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env))
    revs = {}
    for commit in shown:
        for exp in [commit, *(commit.get("experiments") or [])]:
            for rev in exp.get("revs") or [exp]:
                revs[rev.get("name") or rev.get("rev")] = rev
    for name in EXPS:
        files = revs[name]["data"]["metrics"]
        assert set(files) == {"outputs/metrics.json"}  # the headline only
        assert files["outputs/metrics.json"]["data"]["lift"] > 0.1575
    plain = _run(["dvc", "exp", "show", "--no-pager"], repo, env)
    narrow = _run(EXP_SHOW_NARROW, repo, env)
    print(f"dvc exp show width: default {_width(plain)}, narrow {_width(narrow)}")
    assert _width(narrow) <= 140 and all(name in narrow for name in EXPS)
    for col in ("score", "lift", "lift_lo", "lift_hi"):
        assert f" {col} " in narrow.splitlines()[1] + " "

    _run(["dvc", "plots", "diff", *EXPS, "-o", str(tmp_path / "plots")], repo, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    for title in ("Per-head score", "pair-AUC lift", "Score histogram", "Per-layer mean score"):
        assert title in page, title
    for name in EXPS:
        assert f'"rev": "{name}"' in page
        data = _run(["git", "show", f"{revs[name]['rev']}:outputs/plot_data/head_scores.csv"],
                    repo, env)  # fmt: skip
        scores = [r["score"] for r in csv.DictReader(io.StringIO(data)) if r["score"]]
        assert scores and all(f'"score": "{s}"' in page for s in scores), scores
