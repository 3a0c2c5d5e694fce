"""MLflow logging: one run per pipeline run. The only module that imports mlflow.

The default store is a SQLite file at the DVC root (`mlflow ui --backend-store-uri
sqlite:///mlflow.db` shows it) with artifacts in `mlartifacts/` beside it: MLflow 3
prefers a database store, and an explicit artifact folder keeps artifacts readable
whatever the cwd of later readers. Only config fields, derived metrics and public
identifiers are logged, never environment variables, so no secret can leak into a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from head_explain.artifacts import read_jsonl, read_parquet, write_json
from head_explain.escaping import md_escape
from head_explain.heads import head_name
from head_explain.run_records import (
    detail_numbers,
    log_heads_table,
    log_llm_traces,
    per_head_extra_metrics,
    read_llm_calls,
)
from head_explain.tracking_store import artifact_root, redact, store_lock, tracking_uri

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000
PARAM_BATCH = 100
METRIC_BATCH = 1000
ARTIFACT_FILES = (
    "report.md", "summary.csv", "metrics.json", "clusters.json", "explanations.jsonl",
    "scores.parquet",
)  # fmt: skip
_QUIET_LOGGERS = ("mlflow", "alembic", "sqlalchemy")


def _quiet() -> None:
    """No telemetry, no INFO chatter from mlflow/alembic in stage logs."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # mlflow installs its own INFO handler at import ("Creating initial MLflow database
    # tables"); this env var is what it reads for that handler's level.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def config_params(cfg: Any) -> dict[str, str]:
    """All resolved config fields as MLflow params (flattened, redacted, truncated)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = dataclasses.asdict(obj)
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = obj

    walk("", cfg)
    return {k: redact(str(v))[:MAX_PARAM_LEN] for k, v in flat.items()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", sha) else None


def _finite(x: Any) -> bool:
    try:
        return x is not None and not isinstance(x, bool) and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def collect_metrics(outdir: Path, metrics: dict) -> dict[str, float]:
    """Aggregates, per-layer and per-head scores, stage timings and LLM usage."""
    out = {k: float(v) for k, v in metrics.items() if _finite(v)}
    scores_path = outdir / "scores.parquet"
    if scores_path.exists():
        sc, _ = read_parquet(scores_path)
        for r in sc.itertuples(index=False):
            name = head_name(int(r.layer), int(r.head))
            if _finite(r.score):
                out[f"score/{name}"] = float(r.score)
            if _finite(r.baseline_score):
                out[f"baseline/{name}"] = float(r.baseline_score)
        fin = sc[sc["score"].map(_finite)]
        for layer, mean in fin.groupby("layer")["score"].mean().items():
            out[f"layer_mean/L{int(layer)}"] = float(mean)
    for p in sorted((outdir / "metrics").glob("*.json")):
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if _finite(m.get("seconds")):
            out[f"seconds/{p.stem}"] = float(m["seconds"])
        for k, v in (m.get("llm") or {}).items():
            if _finite(v):
                out[f"llm/{p.stem}/{k}"] = float(v)
    return out


def _tags(cfg: Any, outdir: Path) -> dict[str, str]:
    tags = {"model": str(cfg.model)}
    ex_path = outdir / "explanations.jsonl"
    if ex_path.exists():
        ex = read_jsonl(ex_path)
        for key, tag in (("explainer_model", "explainer_model"), ("prompt_sha", "prompt_sha")):
            common = Counter(str(r[key]) for r in ex if r.get(key)).most_common(1)
            if common:
                tags[tag] = common[0][0]
    scores_path = outdir / "scores.parquet"
    if scores_path.exists():
        sc, _ = read_parquet(scores_path, columns=["simulator_model"])
        common = Counter(str(x) for x in sc["simulator_model"].dropna()).most_common(1)
        if common:
            tags["simulator_model"] = common[0][0]
    for env, tag in (
        ("DVC_EXP_NAME", "dvc_exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    sha = _git_commit()
    if sha:
        tags["git_commit"] = sha
    return {k: redact(v)[:MAX_PARAM_LEN] for k, v in tags.items()}


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def log_run(cfg: Any, outdir: str | Path, metrics: dict) -> str:
    """Log one run (params, metrics, tags, artifacts); write mlflow_run.json; run id."""
    _quiet()
    with warnings.catch_warnings():
        # mlflow's SQLAlchemy store emits deprecation noise that users cannot act on
        warnings.simplefilter("ignore", DeprecationWarning)
        return _log_run(cfg, Path(outdir), metrics)


def _log_run(cfg: Any, outdir: Path, metrics: dict) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    exp_name = str(cfg.mlflow_experiment)
    with store_lock(uri):  # first use creates the db (alembic) and the experiment
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment_id(client, exp_name, uri)
    tags = _tags(cfg, outdir)
    run = client.create_run(exp_id, tags=tags, run_name=tags.get("dvc_exp_name"))
    run_id = run.info.run_id
    try:
        params = [Param(k, v) for k, v in config_params(cfg).items()]
        for i in range(0, len(params), PARAM_BATCH):
            client.log_batch(run_id, params=params[i : i + PARAM_BATCH], synchronous=True)
        now = int(time.time() * 1000)
        values = collect_metrics(outdir, metrics) | detail_numbers(metrics)
        values |= per_head_extra_metrics(outdir)
        ms = [Metric(k, v, now, 0) for k, v in values.items()]
        for i in range(0, len(ms), METRIC_BATCH):
            client.log_batch(run_id, metrics=ms[i : i + METRIC_BATCH], synchronous=True)
        client.log_batch(run_id, tags=[RunTag("mlflow.note.content", _note(cfg, metrics))])
        for name in ARTIFACT_FILES:
            if (outdir / name).exists():
                client.log_artifact(run_id, str(outdir / name))
        if (outdir / "plots").is_dir():
            client.log_artifacts(run_id, str(outdir / "plots"), artifact_path="plots")
        if (outdir / "browser").is_dir():  # the head browser opens from the artifact view
            client.log_artifacts(run_id, str(outdir / "browser"), artifact_path="browser")
        log_heads_table(client, run_id, outdir)
        n_traces = _log_traces(client, uri, exp_id, run_id, outdir)
        log.info("mlflow: heads table and %d LLM call trace(s) logged", n_traces)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    write_json(
        outdir / "mlflow_run.json",
        {
            "run_id": run_id,
            "experiment_id": exp_id,
            "experiment_name": exp_name,
            "tracking_uri": redact(uri),
        },
    )
    log.info("mlflow: run %s in experiment '%s' at %s", run_id, exp_name, redact(uri))
    return run_id


def _note(cfg: Any, metrics: dict) -> str:
    """The run description (Markdown in the MLflow UI): headline numbers + where to look."""

    def f(key: str) -> str:
        v = metrics.get(key)
        return f"{float(v):.3f}" if _finite(v) else "n/a"

    n_clusters = (metrics.get("detail") or {}).get("n_clusters", "n/a")
    return (
        f"{md_escape(cfg.model)}: mean score {f('score')} over {metrics.get('scored', 'n/a')} "
        f"scored heads; on the {metrics.get('paired', 'n/a')} heads with a shuffled baseline, "
        f"lift {f('lift')} (95% CI {f('lift_lo')} to {f('lift_hi')}), {n_clusters} clusters. "
        "Full report: artifact `report.md` (plots under `plots/`, per-head table "
        "`summary.csv`, `heads_table.json`)."
    )


def _log_traces(client: Any, uri: str, exp_id: str, run_id: str, outdir: Path) -> int:
    """LLM call records -> traces in this run's store (exported synchronously, so they
    are there when the stage ends; the exporter binds the global URI when it starts)."""
    if not read_llm_calls(outdir):
        return 0
    import mlflow
    import mlflow.tracing

    os.environ["MLFLOW_ENABLE_ASYNC_TRACE_LOGGING"] = "false"
    mlflow.set_tracking_uri(uri)
    mlflow.tracing.reset()
    return log_llm_traces(client, exp_id, run_id, outdir)


# ------------------------------------------------------------ preflight and first use
