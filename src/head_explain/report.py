"""The data behind the human-facing end of the pipeline: artifacts in, one summary row
per head and the headline metrics out. Presentation lives elsewhere: report_md.py
(Markdown through a Jinja2 template), report_plots.py (PNG plots and DVC plot data),
escaping.py (untrusted text)."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from head_explain.artifacts import read_jsonl, read_parquet
from head_explain.escaping import is_finite, json_num
from head_explain.headline import paired_stats
from head_explain.heads import head_name

log = logging.getLogger(__name__)

STAT_COLS = (
    "mean_act", "max_act", "bos_frac", "mean_attn_dist", "prev_token",
    "duplicate_token", "induction", "n_events",
)  # fmt: skip
# Pair-scoring columns of scores.parquet (head-aware scoring); carried when present.
PAIR_COLS = (
    "pair_auc_easy", "pair_auc_hard", "template_auc_easy", "template_auc_hard",
    "shuffled_auc_easy", "shuffled_auc_hard", "lift_easy", "lift_hard",
    "clause_auc_easy", "clause_auc_hard", "added_easy", "added_hard",
)  # fmt: skip
LLM_KEYS = ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd")


def _read_optional(path: Path, loader) -> Any:
    if not path.exists():
        log.warning("report: %s is missing; its section is left out", path.name)
        return None
    return loader(path)


def load_inputs(outdir: Path) -> dict[str, Any]:
    """All artifacts the report reads; only explanations and scores are required."""
    stage_metrics = {}
    for p in sorted((outdir / "metrics").glob("*.json")):
        try:
            stage_metrics[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("report: %s is not readable JSON; ignored", p)
    return {
        "explanations": read_jsonl(outdir / "explanations.jsonl"),
        "scores": read_parquet(outdir / "scores.parquet")[0],
        "head_stats": _read_optional(outdir / "head_stats.parquet", lambda p: read_parquet(p)[0]),
        "events": _read_optional(outdir / "events.parquet", lambda p: read_parquet(p)[0]),
        "head_types": _read_optional(outdir / "head_types.parquet", lambda p: read_parquet(p)[0]),
        "evidence": _read_optional(outdir / "evidence.parquet", lambda p: read_parquet(p)[0]),
        "clusters": _read_optional(outdir / "clusters.json", lambda p: json.loads(p.read_text())),
        "stage_metrics": stage_metrics,
    }


def _present(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and str(x) != ""


def _explanation_rows(explanations: list[dict]) -> pd.DataFrame:
    rows = [
        {
            "layer": int(r["layer"]),
            "head": int(r["head"]),
            "explanation": r.get("explanation") or "",
            "explain_error": r.get("error"),
        }
        for r in explanations
    ]
    cols = ["layer", "head", "explanation", "explain_error"]
    return pd.DataFrame(rows, columns=cols).drop_duplicates(["layer", "head"], keep="last")


def _score_rows(scores: pd.DataFrame) -> pd.DataFrame:
    cols = ["layer", "head", "score", "score_top", "score_random", "baseline_score", "error"]
    extra = [c for c in ("baseline_error", "head_class", *PAIR_COLS) if c in scores]
    sc = scores[cols + extra].rename(columns={"error": "score_error"}).copy()
    sc[["layer", "head"]] = sc[["layer", "head"]].astype(int)
    return sc.drop_duplicates(["layer", "head"], keep="last")


def _error_text(row: Any) -> str:
    """Why a head has no explanation or no score ("" when it has both)."""
    parts = []
    if _present(row.explain_error):
        parts.append(f"explain: {row.explain_error}")
    elif not str(row.explanation or "").strip():
        parts.append("explain: empty explanation")
    if _present(row.score_error):
        parts.append(f"simulate: {row.score_error}")
    elif not is_finite(row.score):
        parts.append("simulate: no score")
    return "; ".join(parts)


def _baseline_note(row: Any) -> str:
    """Why a scored head has no baseline ("" when it has one or is not scored)."""
    if not is_finite(row.score) or is_finite(row.baseline_score):
        return ""
    note = getattr(row, "baseline_error", None)
    return str(note) if _present(note) else "baseline simulation gave no score"


def build_summary(
    explanations: list[dict],
    scores: pd.DataFrame,
    head_stats: pd.DataFrame | None,
    clusters: dict | None,
) -> pd.DataFrame:
    """One row per head seen in explanations or scores (summary.csv)."""
    df = _explanation_rows(explanations).merge(
        _score_rows(scores), on=["layer", "head"], how="outer"
    )
    if head_stats is not None and not head_stats.empty:
        hs = head_stats[["layer", "head", *[c for c in STAT_COLS if c in head_stats]]].copy()
        hs[["layer", "head"]] = hs[["layer", "head"]].astype(int)
        df = df.merge(hs, on=["layer", "head"], how="left")
    for c in STAT_COLS:
        if c not in df:
            df[c] = np.nan
    member_of = {
        m: int(c["id"]) for c in (clusters or {}).get("clusters", []) for m in c["members"]
    }
    df = df.sort_values(["layer", "head"]).reset_index(drop=True)
    names = [head_name(int(a), int(b)) for a, b in zip(df["layer"], df["head"], strict=True)]
    rows = list(df.itertuples(index=False))
    out = pd.DataFrame(
        {
            "head": names,
            "layer": df["layer"].astype(int),
            "head_index": df["head"].astype(int),
            "explanation": df["explanation"].fillna(""),
            **{c: df[c].astype(float) for c in ("score", "score_top", "score_random")},
            "baseline_score": df["baseline_score"].astype(float),
            "cluster": [member_of.get(n, -1) for n in names],
            **{c: df[c] for c in STAT_COLS},
            "error": [_error_text(r) for r in rows],
            "baseline_note": [_baseline_note(r) for r in rows],
        }
    )
    if "head_class" in df:
        out["head_class"] = df["head_class"].fillna("")
    for c in PAIR_COLS:
        if c in df:
            out[c] = df[c].astype(float)
    return out


def llm_totals(stage_metrics: dict, explanations: list[dict]) -> dict[str, float]:
    """LLM usage of explain + simulate (from their metrics; else from the explanations)."""
    tot = dict.fromkeys(LLM_KEYS, 0.0)
    seen = False
    for stage in ("explain", "simulate"):
        llm = (stage_metrics.get(stage) or {}).get("llm") or {}
        for k in LLM_KEYS:
            if is_finite(llm.get(k)):
                tot[k] += float(llm[k])
                seen = True
    if not seen:  # metrics files absent: the explanations still know their own cost
        for r in explanations:
            for k in ("prompt_tokens", "completion_tokens", "cost_usd"):
                if is_finite(r.get(k)):
                    tot[k] += float(r[k])
        tot["requests"] = float(len(explanations))
    return tot


def _mean(values: pd.Series) -> float | None:
    v = values.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return json_num(v.mean(), 4) if v.size else None


def pair_metrics(summary: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """Pair-AUC of explanation, template and shuffled, and the paired lift over the
    template, per difficulty; {} when the scores carry no pair scoring."""
    out: dict[str, Any] = {}
    for level in ("easy", "hard"):
        if f"pair_auc_{level}" not in summary:
            continue
        cols = [c for c in (f"pair_auc_{level}", f"template_auc_{level}",
                            f"shuffled_auc_{level}") if c in summary]  # fmt: skip
        same = summary[cols].astype(float).dropna()  # the three means over the same heads
        out[f"pairs_{level}"] = len(same)
        out[f"auc_{level}"] = _mean(same[f"pair_auc_{level}"])
        for name, col in (("tmpl", "template_auc"), ("shuf", "shuffled_auc")):
            if f"{col}_{level}" in summary:
                out[f"{name}_{level}"] = _mean(same[f"{col}_{level}"])
        if f"template_auc_{level}" in summary:
            st = paired_stats(summary[f"pair_auc_{level}"], summary[f"template_auc_{level}"], seed)
            out[f"lift_{level}"] = json_num(st["mean_diff"], 4)
        elif f"lift_{level}" in summary:
            out[f"lift_{level}"] = _mean(summary[f"lift_{level}"])
        if f"clause_auc_{level}" in summary and summary[f"clause_auc_{level}"].notna().any():
            # what the explainer's own part added, over the heads with both numbers
            st = paired_stats(summary[f"pair_auc_{level}"], summary[f"clause_auc_{level}"], seed)
            out[f"clause_{level}"] = json_num(st["mean_baseline"], 4)
            out[f"added_{level}"] = json_num(st["mean_diff"], 4)
    return out


def compute_metrics(
    summary: pd.DataFrame,
    stage_metrics: dict,
    explanations: list[dict],
    n_analysed: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The headline (outputs/metrics.json, the only DVC metrics file); NaN never leaks.

    `score` is the mean over scored heads; `baseline`, `lift` (mean of score - baseline)
    and its 95% interval `lift_lo`..`lift_hi` and `above` (share of heads beating their
    own baseline) are over the `paired` heads that have both numbers.
    """
    st = paired_stats(summary["score"], summary["baseline_score"], seed)
    llm = llm_totals(stage_metrics, explanations)
    explained = summary["explanation"].astype(str).str.strip() != ""
    return {
        "analysed": int(n_analysed if n_analysed is not None else len(summary)),
        "explained": int(explained.sum()),
        "scored": int(np.isfinite(summary["score"].to_numpy(dtype=float)).sum()),
        "failed": int((summary["error"] != "").sum()),
        "score": _mean(summary["score"]),
        "paired": st["n"],
        "baseline": json_num(st["mean_baseline"], 4),
        "lift": json_num(st["mean_diff"], 4),
        "lift_lo": json_num(st["ci_low"], 4),
        "lift_hi": json_num(st["ci_high"], 4),
        "above": json_num(st["share_above"], 3),
        **pair_metrics(summary, seed),
        "requests": int(llm["requests"]),
        "tokens": int(llm["prompt_tokens"] + llm["completion_tokens"]),
        "cost_usd": round(llm["cost_usd"], 4),
    }


def detail_metrics(summary: pd.DataFrame, clusters: dict | None, stage_metrics: dict,
                   explanations: list[dict], seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Everything else worth a number (metrics/report.json and MLflow, not DVC)."""
    st = paired_stats(summary["score"], summary["baseline_score"], seed)
    s = summary["score"].to_numpy(dtype=float)
    fin = s[np.isfinite(s)]
    n_emb = (clusters or {}).get("params", {}).get("n_embedded")
    noise = (clusters or {}).get("noise")
    llm = llm_totals(stage_metrics, explanations)
    reasons = Counter(e.split(";")[0] for e in summary["error"] if e)
    base_reasons = Counter(n for n in summary["baseline_note"] if n)
    return {
        "median_score": json_num(np.median(fin)) if fin.size else None,
        "frac_above_0_5": json_num(float((fin > 0.5).mean())) if fin.size else None,
        "paired": st,
        "no_score_reasons": dict(reasons.most_common()),
        "no_baseline_reasons": dict(base_reasons.most_common()),
        "n_clusters": len(clusters["clusters"]) if clusters else None,
        "noise_fraction": json_num(len(noise) / n_emb) if clusters and n_emb else None,
        "prompt_tokens": int(llm["prompt_tokens"]),
        "completion_tokens": int(llm["completion_tokens"]),
        "llm_cache_hits": int(llm["cache_hits"]),
    }
