"""report.md: plain data for templates/report.md.j2, rendered with Jinja2.

This module only picks and orders what the report shows; the Markdown layout is the
template's, and every untrusted string is escaped there by the `md` filter.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from head_explain.config import source_list
from head_explain.escaping import fmt, md_escape, render_excerpt
from head_explain.report_heads import (
    added_rows,
    class_rows,
    evidence_by_head,
    head_extras,
    head_rows,
    pair_rows,
    undefined_pairs,
)

STAGES = (
    "sample",
    "head_types",
    "cache",
    "select",
    "explain",
    "simulate",
    "cluster",
    "browser",
    "report",
)
N_BEST = 5
N_EVENTS = 3
TEMPLATES = Path(__file__).parent / "templates"


@lru_cache(maxsize=1)
def _env() -> Any:
    import jinja2

    # Markdown, not HTML: autoescape would turn the escaped text into double entities.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.ChainableUndefined,  # absent optional keys -> default()
        autoescape=False,
    )
    env.filters["md"] = md_escape
    env.filters["num"] = fmt
    return env


def _settings(cfg: Any, ctx: dict) -> list[list[str]]:
    sm, ex, sc = ctx["stage_metrics"], ctx["explanations"], ctx["scores"]
    explainer = Counter(r.get("explainer_model") for r in ex if r.get("explainer_model"))
    explainer_s = ", ".join(explainer) or (sm.get("explain") or {}).get("model") or "n/a"
    sim = sorted({str(x) for x in sc.get("simulator_model", pd.Series()).dropna()})
    sim_s = ", ".join(sim) or (sm.get("simulate") or {}).get("model") or "n/a"
    method = Counter(str(x) for x in sc.get("method", pd.Series()).dropna())
    info = [
        ("model", cfg.model),
        ("sources", ", ".join(source_list(cfg))),
        ("windows × window_len", f"{cfg.windows} × {cfg.window_len}"),
        ("topk", cfg.topk),
        ("explainer", explainer_s),
        ("simulator", sim_s),
        ("method", ", ".join(f"{k} ({v})" for k, v in method.items()) or "n/a"),
    ]
    return [[md_escape(k), md_escape(v)] for k, v in info]


def _llm_rows(stage_metrics: dict) -> list[list[str]]:
    rows = []
    for stage in ("explain", "simulate"):
        llm = (stage_metrics.get(stage) or {}).get("llm") or {}
        if llm:
            keys = ("requests", "cache_hits", "retries", "failures", "prompt_tokens",
                    "completion_tokens")  # fmt: skip
            cost = f"${float(llm.get('cost_usd') or 0):.4f}"
            rows.append([stage, *[md_escape(llm.get(k, "n/a")) for k in keys], cost])
    return rows


def _wall_rows(wall: dict[str, float]) -> list[list[str]]:
    order = [s for s in STAGES if s in wall] + sorted(set(wall) - set(STAGES))
    return [[md_escape(s), fmt(wall[s], 1)] for s in order]


def _dist_rows(summary: pd.DataFrame) -> list[list[str]]:
    rows = []
    for col, name in (
        ("score", "explanation (all events)"),
        ("baseline_score", "shuffled-explanation baseline"),
        ("score_top", "explanation, top events"),
        ("score_random", "explanation, random events"),
    ):
        v = summary[col].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        stats = [fmt(v.mean()), fmt(np.median(v)), fmt((v > 0.5).mean(), 2)] if v.size else []
        rows.append([name, str(v.size), *(stats or ["n/a"] * 3)])
    return rows


def _layer_rows(summary: pd.DataFrame) -> list[list[str]]:
    rows = []
    for layer, g in summary.groupby("layer", sort=True):
        fin = g[np.isfinite(g["score"])]
        best = fin.loc[fin["score"].idxmax()] if len(fin) else None
        rows.append(
            [
                str(layer), str(len(g)), str(len(fin)),
                fmt(fin["score"].mean()) if len(fin) else "n/a",
                fmt(g["baseline_score"].mean()),
                f"{best['head']} ({fmt(best['score'])})" if best is not None else "n/a",
            ]
        )  # fmt: skip
    return rows


def _as_list(x: Any) -> list:
    """Parquet list cells arrive as numpy arrays (or None): make them plain lists."""
    return [] if x is None else list(x)


def _excerpts(events: pd.DataFrame | None, layer: int, head: int) -> list[dict]:
    if events is None or "excerpt_tokens" not in events:
        return []
    ev = events[(events["layer"] == layer) & (events["head"] == head)]
    ev = ev[ev["split"] == "explain"].sort_values("rank").head(N_EVENTS)
    out = []
    for r in ev.itertuples(index=False):
        srcs = _as_list(getattr(r, "excerpt_src", None))
        n_src = len(_as_list(getattr(r, "src_pos", None)))
        extra = f" (+{n_src - len(srcs)} source(s) before the excerpt)" if n_src > len(srcs) else ""
        text = render_excerpt(list(r.excerpt_tokens), int(r.excerpt_dest), srcs)
        out.append({"act": getattr(r, "act_norm", None), "text": text, "extra": extra})
    return out


def _head_blocks(rows: pd.DataFrame, events: pd.DataFrame | None, evidence: dict) -> list[dict]:
    return [
        {
            "head": r["head"], "score": r["score"], "baseline": r["baseline_score"],
            "explanation": r["explanation"], "evidence": evidence.get(r["head"], ""),
            **head_extras(r),
            "excerpts": _excerpts(events, int(r["layer"]), int(r["head_index"])),
        }
        for _, r in rows.iterrows()
    ]  # fmt: skip


def _best_worst(summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    fin = summary[np.isfinite(summary["score"])]
    ranked = fin.sort_values(["score", "layer", "head_index"], ascending=[False, True, True])
    best = ranked.head(N_BEST)
    worst = ranked.iloc[::-1]
    return best, worst[~worst["head"].isin(best["head"])].head(N_BEST)


def render_markdown(cfg: Any, ctx: dict, summary: pd.DataFrame, wall: dict, paired: dict) -> str:
    best, worst = _best_worst(summary)
    evidence = evidence_by_head(ctx.get("evidence"))
    types = ctx.get("head_types")
    bad = summary[summary["error"] != ""]
    no_base = summary[summary["baseline_note"] != ""]
    text = (
        _env()
        .get_template("report.md.j2")
        .render(
            settings=_settings(cfg, ctx),
            has_browser=(Path(cfg.outdir) / "browser" / "index.html").exists(),
            llm_rows=_llm_rows(ctx["stage_metrics"]),
            wall_rows=_wall_rows(wall),
            dist_rows=_dist_rows(summary),
            paired=paired,
            layer_rows=_layer_rows(summary),
            clusters=ctx["clusters"],
            best=_head_blocks(best, ctx["events"], evidence),
            worst=_head_blocks(worst, ctx["events"], evidence),
            n_model_heads=0 if types is None else len(types),
            class_rows=class_rows(types, summary),
            pair_rows=pair_rows(summary, cfg.seed),
            added_rows=added_rows(summary, cfg.seed),
            undefined_pairs=undefined_pairs(summary),
            head_rows=head_rows(summary),
            failed_rows=[
                [md_escape(r["head"]), md_escape(r["error"], max_len=300)]
                for _, r in bad.iterrows()
            ],  # fmt: skip
            no_baseline=[
                f"{md_escape(r['head'])} ({md_escape(r['baseline_note'], max_len=200)})"
                for _, r in no_base.iterrows()
            ],  # fmt: skip
        )
    )
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
