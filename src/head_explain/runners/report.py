"""Stage 'report': every earlier artifact -> report.md, summary.csv, metrics.json,
plots/ and one MLflow run (mlflow_run.json links it back)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from head_explain.artifacts import atomic_path, write_json, write_text
from head_explain.config import Config
from head_explain.report import (
    build_summary,
    compute_metrics,
    fmt,
    is_finite,
    load_inputs,
    plot_score_hist,
    plot_score_map,
    render_markdown,
)

log = logging.getLogger(__name__)

STAGE = "report"


def preflight(cfg: Config) -> None:
    """Nothing beyond the config schema (MLflow is reached at the end of the stage)."""


def run(cfg: Config) -> dict[str, Any]:
    from head_explain.tracking import log_run

    metrics = write_report(cfg)
    run_id = log_run(cfg, cfg.outdir, metrics)
    return {**metrics, "mlflow_run_id": run_id}


def write_report(cfg: Config, wall_times: dict | None = None) -> dict[str, Any]:
    """Write report.md, summary.csv, metrics.json and plots/; return metrics."""
    outdir = Path(cfg.outdir)
    ctx = load_inputs(outdir)
    summary = build_summary(ctx["explanations"], ctx["scores"], ctx["head_stats"], ctx["clusters"])
    wall = {
        k: float(v["seconds"])
        for k, v in ctx["stage_metrics"].items()
        if isinstance(v, dict) and is_finite(v.get("seconds"))
    }
    wall.update({k: float(v) for k, v in (wall_times or {}).items() if is_finite(v)})
    plots = outdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_score_map(summary, plots / "score_map.png")
    plot_score_hist(summary, plots / "score_hist.png")
    with atomic_path(plots / "scores.csv") as tmp:
        summary[["head", "layer", "score", "baseline_score"]].to_csv(tmp, index=False)
    with atomic_path(outdir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    metrics = compute_metrics(summary, ctx["clusters"], ctx["stage_metrics"], ctx["explanations"])
    write_json(outdir / "metrics.json", metrics)
    write_text(outdir / "report.md", render_markdown(cfg, ctx, summary, wall))
    log.info("report: %d heads, mean score %s", metrics["n_heads"], fmt(metrics["mean_score"]))
    return metrics
