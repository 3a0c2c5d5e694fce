"""MLflow logging into a throwaway SQLite store, read back through mlflow's own API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from head_explain import config
from head_explain.runners.report import write_report
from head_explain.tracking import config_params, log_run, tracking_uri

sys.path.insert(0, str(Path(__file__).parent))
from test_report import write_artifacts  # noqa: E402

SECRET = "sk-test-do-not-log-0123456789"


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One run logged (the SQLite store takes seconds to create: share it)."""
    tmp = tmp_path_factory.mktemp("mlflow")
    out = tmp / "outputs"
    write_artifacts(out)
    cfg = config.build(
        {
            "outdir": str(out),
            "mlflow_experiment": "test-exp",
            "openai_base_url": f"https://user:{SECRET}@llm.example/v1?api_key={SECRET}",
            "data_files": "x" * 7000,
        }
    )
    metrics = write_report(cfg)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("DVC_EXP_NAME", "exp-one")
        mp.setenv("DVC_EXP_BASELINE_REV", "abc")
        mp.setenv("OPENAI_API_KEY", SECRET)
        run_id = log_run(cfg, out, metrics)
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(tracking_uri())
        runs = mlflow.search_runs(experiment_names=["test-exp"], output_format="list")
        client = MlflowClient(tracking_uri())
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        plots = {a.path for a in client.list_artifacts(run_id, "plots")}
        local = client.download_artifacts(run_id, "report.md", str(tmp / "dl"))
        second = log_run(cfg, out, metrics)  # the experiment exists now
        mlflow.set_tracking_uri(None)
    return {
        "tmp": tmp, "out": out, "run_id": run_id, "runs": runs, "artifacts": artifacts,
        "plots": plots, "report": Path(local).read_text(), "second": second,
    }  # fmt: skip


def test_run_params_metrics_tags(logged):
    (run,) = [r for r in logged["runs"] if r.info.run_id == logged["run_id"]]
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert set(config_params(config.Config())) <= set(p)
    assert p["model"] == "gpt2" and p["mlflow_experiment"] == "test-exp"
    assert len(p["data_files"]) == 6000
    assert m["score/L2H0"] == pytest.approx(0.4)
    assert "score/L1H1" not in m and "score/L2H1" not in m  # NaN scores are skipped
    assert m["baseline/L1H1"] == pytest.approx(0.03)
    assert m["layer_mean/L0"] == pytest.approx(0.05)
    assert m["mean_score"] == pytest.approx(0.175) and m["n_clusters"] == 2
    assert m["seconds/cache"] == 2.0 and m["llm/explain/prompt_tokens"] == 600
    assert m["prompt_tokens"] == 1200 and m["cost_usd"] == pytest.approx(0.012)
    assert t["model"] == "gpt2" and t["explainer_model"] == "gpt-4o-mini"
    assert t["simulator_model"] == "sim-m" and t["prompt_sha"] == "abc123"
    assert t["dvc_exp_name"] == "exp-one" and t["dvc_exp_baseline_rev"] == "abc"
    assert run.info.run_name == "exp-one"


def test_no_secret_is_logged(logged):
    for run in logged["runs"]:
        blob = json.dumps([run.data.params, run.data.tags])
        assert SECRET not in blob
        assert "OPENAI_API_KEY" not in blob
    assert "llm.example/v1" in run.data.params["openai_base_url"]


def test_artifacts_readable(logged):
    assert {"report.md", "summary.csv", "clusters.json", "explanations.jsonl"} <= {
        Path(a).name for a in logged["artifacts"]
    }
    assert {"scores.parquet", "plots"} <= logged["artifacts"]
    assert {"plots/score_map.png", "plots/score_hist.png", "plots/scores.csv"} <= logged["plots"]
    assert logged["report"] == (logged["out"] / "report.md").read_text()
    # artifacts live beside the db, not in the cwd
    assert list((logged["tmp"] / "mlartifacts").rglob("report.md"))


def test_mlflow_run_json(logged):
    info = json.loads((logged["out"] / "mlflow_run.json").read_text())
    assert info["run_id"] == logged["second"]  # rewritten by the latest run
    assert info["experiment_name"] == "test-exp"
    assert info["tracking_uri"].startswith("sqlite:///") and info["experiment_id"]
    assert logged["second"] != logged["run_id"] and len(logged["runs"]) == 1


def test_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.delenv("DVC_ROOT")
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking_uri() == "http://localhost:5000"
