"""`head-explain` end to end: the bundled model, the embedded LLM, tiny params.

One full run (module fixture) is shared by the tests; the reruns (skip flags, the
explain stage against a warm LLM cache) reuse its outdir and check only what they
change themselves, so the tests hold in any order.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import warnings
from pathlib import Path

import pandas as pd
import pytest
from helpers import head_explain_command

from head_explain import config

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
TINY = [
    "--windows", "40", "--window-len", "32", "--max-heads", "3", "--topk", "8",
    "--candidates", "16", "--random-windows", "6", "--explain-examples", "3",
    "--score-top-examples", "1", "--score-random-examples", "1", "--excerpt-len", "8",
    "--min-cluster-size", "2",
]  # fmt: skip
ARTIFACTS = (
    "windows.parquet", "raw_events.parquet", "head_stats.parquet", "activations.parquet",
    "events.parquet", "explanations.jsonl", "scores.parquet", "clusters.json", "report.md",
    "summary.csv", "metrics.json", "mlflow_run.json", "plots/score_map.png",
)  # fmt: skip
EXPERIMENT = "head-explain"

pytestmark = pytest.mark.slow


def _command() -> list[str]:
    return head_explain_command()


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.out = root / "out"
        self.cache = root / "cache.sqlite"
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"

    def run(self, *args: str, outdir: Path | None = None, check: bool = True):
        argv = [
            *_command(), "--params", str(PARAMS), "--outdir", str(outdir or self.out),
            *TINY, "--llm-cache", str(self.cache), *args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        env.update(
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
            HEAD_EXPLAIN_PROGRESS="0", MLFLOW_TRACKING_URI=self.tracking_uri,
            MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="1",
        )  # fmt: skip
        env.pop("DVC_ROOT", None)
        proc = subprocess.run(
            argv, cwd=self.root, env=env, capture_output=True, text=True, timeout=600
        )
        if check:
            assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
            assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        return proc

    def runs(self):
        from mlflow.tracking import MlflowClient

        with warnings.catch_warnings():  # SQLAlchemy deprecations inside mlflow's store
            warnings.simplefilter("ignore", DeprecationWarning)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            exp = client.get_experiment_by_name(EXPERIMENT)
            return [] if exp is None else client.search_runs([exp.experiment_id])

    def mtimes(self, names) -> dict[str, int]:
        return {n: (self.out / n).stat().st_mtime_ns for n in names}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("e2e"))
    proc = ws.run()
    assert f"report: {(ws.out / 'report.md').resolve()}" in proc.stdout
    return ws


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def test_full_run_writes_every_artifact(ws):
    missing = [a for a in ARTIFACTS if not (ws.out / a).is_file()]
    assert not missing
    for stage in ("sample", "cache", "select", "explain", "simulate", "cluster", "report"):
        assert json.loads((ws.out / "metrics" / f"{stage}.json").read_text())["seconds"] >= 0


def test_every_analysed_head_is_explained_and_scored(ws):
    stats = pd.read_parquet(ws.out / "head_stats.parquet")
    heads = {(int(r.layer), int(r.head)) for r in stats.itertuples()}
    assert len(heads) == 3
    cache_metrics = json.loads((ws.out / "metrics" / "cache.json").read_text())
    assert sorted(cache_metrics["heads"]) == sorted(f"L{a}H{b}" for a, b in heads)

    expl = [json.loads(line) for line in (ws.out / "explanations.jsonl").read_text().splitlines()]
    by_head = {(r["layer"], r["head"]): r for r in expl}
    assert set(by_head) == heads
    for key, r in by_head.items():
        assert (r["explanation"] or "").strip() or r["error"], key
        assert r["explainer_model"] == "smollm2-135m-instruct"
    # most heads must be explained: a path that fails on every head fails here, by name
    unexplained = {f"L{a}H{b}": r["error"] for (a, b), r in by_head.items() if not r["explanation"]}
    assert len(unexplained) <= len(heads) // 3, f"not explained: {unexplained}"

    scores = pd.read_parquet(ws.out / "scores.parquet")
    assert {(int(a), int(b)) for a, b in zip(scores["layer"], scores["head"], strict=True)} == heads
    assert len(scores) == len(heads)
    for r in scores.itertuples():
        if _finite(r.score):
            assert -1 <= r.score <= 1
            assert _finite(r.baseline_score), (r.layer, r.head)
        else:
            assert r.error, (r.layer, r.head)
    unscored = {
        f"L{r.layer}H{r.head}": r.error for r in scores.itertuples() if not _finite(r.score)
    }
    assert len(unscored) <= len(heads) // 3, f"not scored: {unscored}"
    # one record per LLM call, for traces and cost audits
    for stage in ("explain", "simulate"):
        recs = [json.loads(x) for x in (ws.out / "llm_calls" / f"{stage}.jsonl").open()]
        assert recs and {r["stage"] for r in recs} == {stage}
        assert {r["head"] for r in recs} <= {f"L{a}H{b}" for a, b in heads}
        assert all(r["model"] == "smollm2-135m-instruct" and r["cost_usd"] == 0 for r in recs)

    summary = pd.read_csv(ws.out / "summary.csv")
    assert len(summary) == len(heads)
    clusters = json.loads((ws.out / "clusters.json").read_text())
    assert clusters["params"]["min_cluster_size"] == 2
    assert "## " in (ws.out / "report.md").read_text()


def test_mlflow_run_has_per_head_scores(ws):
    run_info = json.loads((ws.out / "mlflow_run.json").read_text())
    runs = {r.info.run_id: r for r in ws.runs()}
    assert run_info["run_id"] in runs
    run = runs[run_info["run_id"]]
    assert run.info.status == "FINISHED"
    assert run.data.params["windows"] == "40" and run.data.params["max_heads"] == "3"
    scores = pd.read_parquet(ws.out / "scores.parquet")
    for r in scores.itertuples():
        if _finite(r.score):
            metric = run.data.metrics[f"score/L{int(r.layer)}H{int(r.head)}"]
            assert metric == pytest.approx(float(r.score))


def test_skip_flags_recluster_and_rereport_only(ws):
    earlier = [
        "windows.parquet", "raw_events.parquet", "head_stats.parquet", "activations.parquet",
        "explanations.jsonl", "scores.parquet", "metrics/sample.json", "metrics/cache.json",
        "metrics/explain.json", "metrics/simulate.json",
    ]  # fmt: skip
    later = ["clusters.json", "report.md", "summary.csv", "metrics.json", "mlflow_run.json"]
    before, before_later = ws.mtimes(earlier), ws.mtimes(later)
    runs_before = {r.info.run_id for r in ws.runs()}
    events_before = pd.read_parquet(ws.out / "events.parquet")

    proc = ws.run("--skip-cache", "--skip-explain", "--skip-simulate", "--min-cluster-size", "3")
    for stage in ("sample", "cache", "explain", "simulate"):
        assert f"stage {stage}: skipped, reusing its artifacts" in proc.stderr
        assert f"stage {stage}: starting" not in proc.stderr
    assert ws.mtimes(earlier) == before
    after_later = ws.mtimes(later)
    assert all(after_later[n] > before_later[n] for n in later), (before_later, after_later)
    # select has no skip flag: it reruns, deterministically.
    pd.testing.assert_frame_equal(pd.read_parquet(ws.out / "events.parquet"), events_before)

    clusters = json.loads((ws.out / "clusters.json").read_text())
    assert clusters["params"]["min_cluster_size"] == 3
    new_runs = {r.info.run_id for r in ws.runs()} - runs_before
    assert len(new_runs) == 1
    assert json.loads((ws.out / "mlflow_run.json").read_text())["run_id"] in new_runs


def test_explain_rerun_hits_the_llm_cache_only(ws):
    expl_before = (ws.out / "explanations.jsonl").read_text()
    ws.run("--skip-cache", "--until", "explain")
    metrics = json.loads((ws.out / "metrics" / "explain.json").read_text())
    assert metrics["llm"]["requests"] == 0, metrics
    assert metrics["llm"]["cache_hits"] > 0, metrics
    assert metrics["heads"] == 3 and metrics["failed"] == 0
    assert (ws.out / "explanations.jsonl").read_text() == expl_before


def test_skip_cache_refuses_artifacts_of_other_windows(ws):
    names = sorted(p.name for p in ws.out.iterdir())
    mtimes = ws.mtimes(names)
    proc = ws.run("--skip-cache", "--windows", "41", check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert "--skip-cache:" in proc.stderr and "other sample params" in proc.stderr
    assert ws.mtimes(names) == mtimes


def test_until_select_stops_after_select(ws):
    later = ["explanations.jsonl", "scores.parquet", "clusters.json", "report.md",
             "summary.csv", "metrics.json", "mlflow_run.json", "metrics/explain.json"]  # fmt: skip
    before = ws.mtimes(later)
    events_before = ws.mtimes(["events.parquet"])
    runs_before = len(ws.runs())
    proc = ws.run("--skip-cache", "--until", "select")
    assert "stage select: done" in proc.stderr
    for stage in ("explain", "simulate", "cluster", "report"):
        assert f"stage {stage}" not in proc.stderr, stage
    assert ws.mtimes(["events.parquet"]) != events_before  # select ran ...
    assert ws.mtimes(later) == before  # ... and nothing after it
    assert len(ws.runs()) == runs_before


def test_help_lists_every_config_key():
    proc = subprocess.run([*_command(), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for name in config.FIELDS:
        assert f"--{name.replace('_', '-')}" in proc.stdout, name
    for flag in ("--params", "--skip-cache", "--skip-explain", "--skip-simulate",
                 "--skip-cluster", "--until", "--verbose"):  # fmt: skip
        assert flag in proc.stdout
