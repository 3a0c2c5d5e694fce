"""The human-facing end of the pipeline: report.md, summary.csv, metrics.json, plots/.

Everything shown that came from the corpus or from an LLM is untrusted: an explanation
or a token may contain `|`, `<script>`, `](javascript:...)` or a newline. Every such
string goes through `md_escape`, which leaves one line of inert text, so the report
renders the same on GitHub and in the MLflow UI whatever the model wrote.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from head_explain.artifacts import atomic_path, read_jsonl, read_parquet
from head_explain.config import source_list
from head_explain.heads import head_name

log = logging.getLogger(__name__)

STAGES = ("sample", "cache", "select", "explain", "simulate", "cluster", "report")
STAT_COLS = (
    "mean_act", "max_act", "bos_frac", "mean_attn_dist", "prev_token",
    "duplicate_token", "induction", "n_events",
)  # fmt: skip
N_BEST = 5
N_EVENTS = 3
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#$])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_NEWLINES = re.compile(r"\r\n|\r|\n")


# --- escaping and formatting ---------------------------------------------------------


def md_escape(text: Any, max_len: int | None = None) -> str:
    """Untrusted text -> one line of literal Markdown (safe in table cells too).

    HTML specials become entities (no tags, no entity tricks), Markdown punctuation that
    could open emphasis, code, links, tables, strikethrough, math or headings gets a
    backslash, newlines become spaces, and a leading list/quote marker is neutralised.
    """
    s = "" if text is None else str(text)
    s = _NEWLINES.sub(" ", s).replace("\t", " ")
    s = _CONTROL.sub("", s)
    if max_len is not None and len(s) > max_len:
        s = s[: max_len - 1] + "…"
    s = html.escape(s, quote=False)
    s = _MD_SPECIAL.sub(r"\\\1", s)
    # a string that starts a line must not open a list, heading or thematic break
    s = re.sub(r"^(\s*)([-+=])", r"\1\\\2", s)
    s = re.sub(r"^(\s*\d+)([.)])", r"\1\\\2", s)
    return s


def _visible(tok: str) -> str:
    """Whitespace tokens made visible so an excerpt stays one readable line."""
    return _NEWLINES.sub("↵", tok).replace("\t", "⇥")


def render_excerpt(tokens: list[str], dest: int, srcs: list[int] | None = None) -> str:
    """One-line excerpt: <b>destination</b> and \\[\\[source\\]\\] tokens marked.

    `<b>` is used rather than `**` because emphasis delimiters next to punctuation
    tokens often fail CommonMark's flanking rules and would show as literal stars.
    """
    src_set = {int(i) for i in (srcs or [])}
    parts = []
    for i, raw in enumerate(tokens):
        tok = _visible(str(raw))
        marked = i == dest or i in src_set
        core = tok.strip(" ")
        if not core:
            if not marked:
                parts.append(" " if tok else "")
                continue
            core, lead, trail = "␣", "", ""
        else:
            lead = " " if tok.startswith(" ") else ""
            trail = " " if tok.endswith(" ") else ""
        esc = md_escape(core)
        if i in src_set:
            esc = f"\\[\\[{esc}\\]\\]"
        if i == dest:
            esc = f"<b>{esc}</b>"
        parts.append(lead + esc + trail)
    return re.sub(r" {2,}", " ", "".join(parts)).strip()


def is_finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt(x: Any, digits: int = 3) -> str:
    """A number for display; None/NaN -> "n/a"."""
    if not is_finite(x):
        return "n/a"
    return f"{float(x):.{digits}f}"


def _num(x: Any) -> float | int | None:
    """A JSON-safe number: NaN/inf -> None, numpy scalars -> Python."""
    if not is_finite(x):
        return None
    v = float(x)
    return int(v) if isinstance(x, (int, np.integer)) else v


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# --- loading and tabulating ----------------------------------------------------------


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
        "clusters": _read_optional(outdir / "clusters.json", lambda p: json.loads(p.read_text())),
        "stage_metrics": stage_metrics,
    }


def build_summary(
    explanations: list[dict],
    scores: pd.DataFrame,
    head_stats: pd.DataFrame | None,
    clusters: dict | None,
) -> pd.DataFrame:
    """One row per head seen in explanations or scores (summary.csv)."""
    ex = pd.DataFrame(
        [
            {
                "layer": int(r["layer"]),
                "head": int(r["head"]),
                "explanation": r.get("explanation") or "",
                "explain_error": r.get("error"),
            }
            for r in explanations
        ],
        columns=["layer", "head", "explanation", "explain_error"],
    ).drop_duplicates(["layer", "head"], keep="last")
    sc_cols = ["layer", "head", "score", "score_top", "score_random", "baseline_score", "error"]
    sc = scores[sc_cols].rename(columns={"error": "score_error"}).copy()
    sc[["layer", "head"]] = sc[["layer", "head"]].astype(int)
    sc = sc.drop_duplicates(["layer", "head"], keep="last")
    df = ex.merge(sc, on=["layer", "head"], how="outer")
    if head_stats is not None and not head_stats.empty:
        hs = head_stats[["layer", "head", *[c for c in STAT_COLS if c in head_stats]]].copy()
        hs[["layer", "head"]] = hs[["layer", "head"]].astype(int)
        df = df.merge(hs, on=["layer", "head"], how="left")
    for c in STAT_COLS:
        if c not in df:
            df[c] = np.nan
    member_of = {}
    for c in (clusters or {}).get("clusters", []):
        for m in c["members"]:
            member_of[m] = int(c["id"])
    df = df.sort_values(["layer", "head"]).reset_index(drop=True)
    names = [head_name(int(a), int(b)) for a, b in zip(df["layer"], df["head"], strict=True)]

    def _err(row) -> str:
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

    out = pd.DataFrame(
        {
            "head": names,
            "layer": df["layer"].astype(int),
            "head_index": df["head"].astype(int),
            "explanation": df["explanation"].fillna(""),
            "score": df["score"].astype(float),
            "score_top": df["score_top"].astype(float),
            "score_random": df["score_random"].astype(float),
            "baseline_score": df["baseline_score"].astype(float),
            "cluster": [member_of.get(n, -1) for n in names],
            **{c: df[c] for c in STAT_COLS},
            "error": [_err(r) for r in df.itertuples(index=False)],
        }
    )
    return out


def _present(x: Any) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and str(x) != ""


def _llm_totals(stage_metrics: dict, explanations: list[dict]) -> dict[str, float]:
    keys = ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "cost_usd")
    tot = dict.fromkeys(keys, 0.0)
    seen = False
    for stage in ("explain", "simulate"):
        llm = (stage_metrics.get(stage) or {}).get("llm") or {}
        for k in keys:
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


def compute_metrics(
    summary: pd.DataFrame, clusters: dict | None, stage_metrics: dict, explanations: list[dict]
) -> dict[str, Any]:
    """Aggregates for metrics.json (DVC metrics) and MLflow; NaN never leaks out."""
    s = summary["score"].to_numpy(dtype=float)
    fin = s[np.isfinite(s)]
    b = summary["baseline_score"].to_numpy(dtype=float)
    b = b[np.isfinite(b)]
    n_emb = (clusters or {}).get("params", {}).get("n_embedded")
    noise = (clusters or {}).get("noise")
    llm = _llm_totals(stage_metrics, explanations)
    return {
        "mean_score": _num(fin.mean()) if fin.size else None,
        "median_score": _num(np.median(fin)) if fin.size else None,
        "baseline_mean": _num(b.mean()) if b.size else None,
        "frac_above_0_5": _num(float((fin > 0.5).mean())) if fin.size else None,
        "n_heads": len(summary),
        "n_scored": int(fin.size),
        "n_failed": int((summary["error"] != "").sum()),
        "n_clusters": len(clusters["clusters"]) if clusters else None,
        "noise_fraction": _num(len(noise) / n_emb) if clusters and n_emb else None,
        "prompt_tokens": int(llm["prompt_tokens"]),
        "completion_tokens": int(llm["completion_tokens"]),
        "cost_usd": round(llm["cost_usd"], 6),
        "llm_requests": int(llm["requests"]),
        "llm_cache_hits": int(llm["cache_hits"]),
    }


# --- plots -----------------------------------------------------------------------------


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_score_map(summary: pd.DataFrame, path: Path) -> None:
    """Layer x head heat map; cells without a score are hatched grey, not coloured.

    The diverging map is fixed to [-1, 1] so maps of different runs compare by eye; a
    score of 0 is near-white, so missing cells get a hatch to stay distinguishable.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n_l = int(summary["layer"].max()) + 1 if len(summary) else 1
    n_h = int(summary["head_index"].max()) + 1 if len(summary) else 1
    grid = np.full((n_l, n_h), np.nan)
    for r in summary.itertuples(index=False):
        grid[r.layer, r.head_index] = r.score
    cmap = colormaps["coolwarm"].with_extremes(bad=(0, 0, 0, 0))
    fig = Figure(figsize=(min(18, 2.5 + 0.45 * n_h), min(18, 1.8 + 0.35 * n_l)))
    ax = fig.subplots()
    ax.set_facecolor("#e4e4e4")
    ax.patch.set_hatch("///")
    ax.patch.set_edgecolor("#a0a0a0")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    if n_l * n_h <= 400:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=25, integer=True))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("explanation score per head (hatched: no score)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)


def plot_score_hist(summary: pd.DataFrame, path: Path) -> None:
    """Real scores against the shuffled-explanation baseline: the gap is the signal."""
    from matplotlib.figure import Figure

    real = summary["score"].to_numpy(dtype=float)
    base = summary["baseline_score"].to_numpy(dtype=float)
    real, base = real[np.isfinite(real)], base[np.isfinite(base)]
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    both = np.concatenate([real, base])
    lo = min(-1.0, float(both.min())) if both.size else -1.0
    hi = max(1.0, float(both.max())) if both.size else 1.0
    bins = np.linspace(lo, hi, 41)
    for vals, name, color in ((real, "explanation", "C0"), (base, "shuffled baseline", "C1")):
        if vals.size:
            ax.hist(vals, bins=bins, alpha=0.55, color=color, label=f"{name} (n={vals.size})")
            ax.axvline(vals.mean(), color=color, ls="--", lw=1)
    if not both.size:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("score (correlation of simulated vs true activations)")
    ax.set_ylabel("heads")
    _save(fig, path)


# --- markdown ---------------------------------------------------------------------------


def _header(cfg: Any, ctx: dict, wall: dict[str, float]) -> list[str]:
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
    lines = ["# Attention head explanations", "", _table(
        ["setting", "value"], [[md_escape(k), md_escape(v)] for k, v in info]
    ), "", "## Cost and time", ""]  # fmt: skip
    rows = []
    for stage in ("explain", "simulate"):
        llm = (sm.get(stage) or {}).get("llm") or {}
        if llm:
            keys = ("requests", "cache_hits", "retries", "failures")
            rows.append(
                [stage, *[str(llm.get(k, "n/a")) for k in keys]]
                + [str(llm.get("prompt_tokens", "n/a")), str(llm.get("completion_tokens", "n/a"))]
                + [f"${float(llm.get('cost_usd') or 0):.4f}"]
            )
    if rows:
        head = ["stage", "requests", "cache hits", "retries", "failures", "prompt tok",
                "completion tok", "cost"]  # fmt: skip
        lines += [_table(head, rows), ""]
    if wall:
        order = [s for s in STAGES if s in wall] + sorted(set(wall) - set(STAGES))
        lines += [
            _table(["stage", "wall time (s)"], [[md_escape(s), fmt(wall[s], 1)] for s in order]),
            "",
        ]
    return lines


def _dist_section(summary: pd.DataFrame) -> list[str]:
    rows = []
    for col, name in (
        ("score", "explanation (all events)"),
        ("baseline_score", "shuffled-explanation baseline"),
        ("score_top", "explanation, top events"),
        ("score_random", "explanation, random events"),
    ):
        v = summary[col].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        rows.append(
            [name, str(v.size)]
            + (
                [fmt(v.mean()), fmt(np.median(v)), fmt((v > 0.5).mean(), 2)]
                if v.size
                else ["n/a"] * 3
            )
        )
    return [
        "## Score distribution", "",
        _table(["scores", "n", "mean", "median", "frac > 0.5"], rows), "",
        "![score histogram: explanation vs shuffled baseline](plots/score_hist.png)", "",
        "## Score map", "",
        "![layer x head map of scores](plots/score_map.png)", "",
    ]  # fmt: skip


def _layer_section(summary: pd.DataFrame) -> list[str]:
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
    head = ["layer", "heads", "scored", "mean score", "mean baseline", "best head"]
    return ["## Per-layer means", "", _table(head, rows), ""]


def _cluster_section(clusters: dict | None) -> list[str]:
    lines = ["## Clusters of explanations", ""]
    if clusters is None:
        return lines + ["clusters.json is missing; run the `cluster` stage.", ""]
    p = clusters.get("params", {})
    lines += [
        f"Embedding model {md_escape(p.get('embedding_model', 'n/a'))}, HDBSCAN "
        f"min_cluster_size={md_escape(p.get('min_cluster_size', 'n/a'))}. "
        f"{md_escape(clusters.get('note', ''))}",
        "",
    ]
    if not clusters.get("clusters"):
        lines += ["No clusters were found.", ""]
    for c in clusters.get("clusters", []):
        lines += [
            f"### Cluster {int(c['id'])}: {md_escape(c['label']) or '(no label)'}",
            "",
            f"size {int(c['size'])} · mean score {fmt(c.get('mean_score'))} · "
            f"representative {md_escape(c['representative'])}",
            "",
            "members: " + ", ".join(md_escape(m) for m in c["members"]),
            "",
        ]
    noise = clusters.get("noise") or []
    lines += [f"Noise ({len(noise)}): " + (", ".join(md_escape(m) for m in noise) or "none"), ""]
    return lines


def _as_list(x: Any) -> list:
    """Parquet list cells arrive as numpy arrays (or None): make them plain lists."""
    return [] if x is None else list(x)


def _events_for(events: pd.DataFrame | None, layer: int, head: int) -> list[str]:
    if events is None or "excerpt_tokens" not in events:
        return []
    ev = events[(events["layer"] == layer) & (events["head"] == head)]
    ev = ev[ev["split"] == "explain"].sort_values("rank").head(N_EVENTS)
    out = []
    for r in ev.itertuples(index=False):
        srcs = _as_list(getattr(r, "excerpt_src", None))
        n_src = len(_as_list(getattr(r, "src_pos", None)))
        extra = f" (+{n_src - len(srcs)} source(s) before the excerpt)" if n_src > len(srcs) else ""
        act = getattr(r, "act_norm", None)
        out.append(
            f"- act {fmt(act, 1)}: "
            + render_excerpt(list(r.excerpt_tokens), int(r.excerpt_dest), srcs)
            + extra
        )
    return out


def _head_block(row: pd.Series, events: pd.DataFrame | None) -> list[str]:
    lines = [
        f"#### {row['head']}: score {fmt(row['score'])}, baseline {fmt(row['baseline_score'])}",
        "",
        f"> {md_escape(row['explanation']) or '(empty)'}",
        "",
    ]
    ev = _events_for(events, int(row["layer"]), int(row["head_index"]))
    return lines + (ev + [""] if ev else [])


def _best_worst_section(summary: pd.DataFrame, events: pd.DataFrame | None) -> list[str]:
    fin = summary[np.isfinite(summary["score"])]
    ranked = fin.sort_values(["score", "layer", "head_index"], ascending=[False, True, True])
    best = ranked.head(N_BEST)
    worst = ranked.iloc[::-1]
    worst = worst[~worst["head"].isin(best["head"])].head(N_BEST)
    lines = [
        "## Best and worst explained heads", "",
        "In excerpts, <b>bold</b> is the token the head writes at and \\[\\[…\\]\\] mark "
        "the source tokens it attends to most; ↵ is a newline.", "",
        "### Best", "",
    ]  # fmt: skip
    for _, r in best.iterrows():
        lines += _head_block(r, events)
    if best.empty:
        lines += ["No head has a finite score.", ""]
    lines += ["### Worst", ""]
    for _, r in worst.iterrows():
        lines += _head_block(r, events)
    if worst.empty:
        lines += ["No further scored heads.", ""]
    return lines


def _failed_section(summary: pd.DataFrame) -> list[str]:
    bad = summary[summary["error"] != ""]
    lines = ["## Failed heads", ""]
    if bad.empty:
        return lines + ["None.", ""]
    rows = [[md_escape(r["head"]), md_escape(r["error"], max_len=300)] for _, r in bad.iterrows()]
    return lines + [_table(["head", "reason"], rows), ""]


def render_markdown(cfg: Any, ctx: dict, summary: pd.DataFrame, wall: dict) -> str:
    lines = _header(cfg, ctx, wall)
    lines += _dist_section(summary)
    lines += _layer_section(summary)
    lines += _cluster_section(ctx["clusters"])
    lines += _best_worst_section(summary, ctx["events"])
    lines += _failed_section(summary)
    return "\n".join(lines).rstrip() + "\n"
