"""dvc.yaml is exactly what tools/dvc_yaml.py generates from the stage graph and each
stage's imports, and editing a module a stage imports makes DVC rerun that stage."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from head_explain.graph import SCRIPTS, STAGES

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("dvc_yaml", REPO / "tools" / "dvc_yaml.py")
dvc_yaml = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dvc_yaml)


def test_dvc_yaml_is_generated_from_the_code():
    assert (REPO / "dvc.yaml").read_text() == dvc_yaml.render(), (
        "dvc.yaml is stale: run `python tools/dvc_yaml.py --write`"
    )


def _runtime_imports(stage: str) -> set[str]:
    """Project modules loaded when the stage's runner runs, found by importing it (a
    second derivation, independent of the ast walk) plus its functions' lazy imports."""
    code = (
        "import sys, runpy; sys.argv=['x']; "
        f"runpy.run_path({SCRIPTS[stage]!r}, run_name='not_main'); "
        "print('\\n'.join(sorted(m.__file__ for m in list(sys.modules.values()) "
        "if m.__name__.startswith('head_explain') and getattr(m, '__file__', None))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return {str(Path(p).resolve().relative_to(REPO)) for p in res.stdout.split()}


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lists_every_module_it_imports(stage):
    deps = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"])
    # what Python actually loads at import time is a subset of the declared deps
    loaded = _runtime_imports(stage)
    assert loaded <= deps, f"{stage}: imported but not in dvc.yaml deps: {loaded - deps}"
    # and every head_explain import written anywhere in a dep is itself a dep
    for dep in deps:
        if not dep.endswith(".py"):
            continue
        for mod in dvc_yaml.imported_modules(REPO / dep):
            path = str(dvc_yaml.module_file(mod).relative_to(REPO))
            assert path in deps, f"{stage}: {dep} imports {mod} ({path}), not a dep"


def test_runner_module_per_stage_named_after_it():
    for stage in STAGES:
        runner = REPO / "src" / "head_explain" / "runners" / f"{stage}.py"
        tree = ast.parse(runner.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"run", "preflight"} <= names, f"{runner} lacks run/preflight"
        assert f'STAGE = "{stage}"' in runner.read_text()


def _git(repo: Path, *args: str) -> str:
    res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return res.stdout


@pytest.mark.slow
def test_editing_a_runner_makes_dvc_status_report_that_stage(tmp_path):
    """In a real git + DVC repo: after a (fake) reproduction is recorded with
    `dvc commit`, editing the select runner marks select (and no earlier stage)."""
    repo = tmp_path / "proj"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "params.yaml"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "stages", repo / "stages")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    dvc = str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    _git(repo, "init", "-q")
    subprocess.run([dvc, "init", "-q"], cwd=repo, check=True, env=env)
    # Stand-in outputs so DVC can record a lock without running the model.
    out = repo / "outputs"
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"].values():
        for item in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            name = item if isinstance(item, str) else next(iter(item))
            path = repo / name.replace("${outdir}", "outputs")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n" if path.suffix == ".json" else "x\n")
    assert out.exists()
    res = subprocess.run(
        [dvc, "commit", "-f", "-q"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    clean = subprocess.run([dvc, "status"], cwd=repo, env=env, capture_output=True, text=True)
    assert "changed" not in clean.stdout, clean.stdout
    runner = repo / "src" / "head_explain" / "runners" / "select.py"
    runner.write_text(runner.read_text() + "\n# an edit\n")
    status = subprocess.run([dvc, "status"], cwd=repo, env=env, capture_output=True, text=True)
    changed = {line.rstrip(":").strip() for line in status.stdout.splitlines()
               if line and not line.startswith((" ", "\t"))}  # fmt: skip
    assert "select" in changed, status.stdout
    assert not changed & {"sample", "cache"}, status.stdout
