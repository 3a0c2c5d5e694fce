"""Stage 'report': every earlier artifact -> report.md, summary.csv, the headline
metrics.json (the one DVC metrics file), plots/, plot_data/ (for `dvc plots`) and one
MLflow run (mlflow_run.json links it back)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from head_explain.artifacts import (
    atomic_path,
    check_parquet,
    read_json,
    read_jsonl,
    write_json,
    write_text,
)
from head_explain.config import Config

log = logging.getLogger(__name__)

STAGE = "report"


def preflight(cfg: Config) -> None:
    """The MLflow store must be usable: it is reached only at the end of the stage."""
    from head_explain.tracking_store import check_tracking

    check_tracking(cfg)


def check_inputs(outdir: Path) -> None:
    """Every artifact the report reads, checked before anything is rewritten."""
    read_jsonl(outdir / "explanations.jsonl")
    check_parquet(outdir / "scores.parquet", full=True)
    for name in ("head_stats.parquet", "events.parquet", "head_types.parquet", "evidence.parquet"):
        if (outdir / name).exists():
            check_parquet(outdir / name, full=True)
    if (outdir / "clusters.json").exists():
        read_json(outdir / "clusters.json")


def run(cfg: Config) -> dict[str, Any]:
    from head_explain.tracking import log_run

    metrics = write_report(cfg)
    run_id = log_run(cfg, cfg.outdir, metrics)
    return {**metrics, "mlflow_run_id": run_id}


def _n_analysed(ctx: dict, n_summary: int) -> int:
    """Heads the cache stage analysed (head_stats), at least the heads in the summary."""
    hs = ctx["head_stats"]
    if hs is None or hs.empty:
        return n_summary
    return max(n_summary, len(hs[["layer", "head"]].drop_duplicates()))


def write_report(cfg: Config, wall_times: dict | None = None) -> dict[str, Any]:
    """Write report.md, summary.csv, metrics.json, plots/ and plot_data/; return the
    headline metrics plus the details (the details go to metrics/report.json only)."""
    from head_explain.escaping import fmt, is_finite
    from head_explain.headline import paired_stats
    from head_explain.report import build_summary, compute_metrics, detail_metrics, load_inputs
    from head_explain.report_md import render_markdown
    from head_explain.report_plots import plot_score_hist, plot_score_map, write_plot_data

    outdir = Path(cfg.outdir)
    check_inputs(outdir)
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
    write_plot_data(summary, outdir)
    with atomic_path(outdir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    sm, ex = ctx["stage_metrics"], ctx["explanations"]
    headline = compute_metrics(summary, sm, ex, _n_analysed(ctx, len(summary)), cfg.seed)
    write_json(outdir / "metrics.json", headline)
    paired = paired_stats(summary["score"], summary["baseline_score"], cfg.seed)
    write_text(outdir / "report.md", render_markdown(cfg, ctx, summary, wall, paired))
    log.info(
        "report: %d heads, %d scored, mean score %s, paired lift %s [%s, %s] over %d heads",
        headline["analysed"], headline["scored"], fmt(headline["score"]), fmt(headline["lift"]),
        fmt(headline["lift_lo"]), fmt(headline["lift_hi"]), headline["paired"],
    )  # fmt: skip
    return {**headline, "detail": detail_metrics(summary, ctx["clusters"], sm, ex, cfg.seed)}
