"""Plots of a report: PNGs for report.md and the CSV data behind `dvc plots`.

The CSVs under plot_data/ are what `dvc plots show` / `dvc plots diff <exp>` draw with
the definitions in dvc.yaml's top-level `plots:` (graph.PLOTS): one row per
head, per layer or per histogram bin, so two experiments overlay point by point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from head_explain.artifacts import atomic_path
from head_explain.graph import PLOT_DATA, PLOTS

HIST_BINS = np.linspace(-1.0, 1.0, 21)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.4f")


def write_plot_data(summary: pd.DataFrame, outdir: Path) -> list[Path]:
    """The four CSVs of graph.PLOTS under outdir/plot_data (always all four: a plot
    without its file is an error in `dvc plots`; absent values are empty cells)."""
    folder = outdir / PLOT_DATA
    folder.mkdir(parents=True, exist_ok=True)
    n_heads = int(summary["head_index"].max()) + 1 if len(summary) else 1
    position = (summary["layer"] + summary["head_index"] / n_heads).round(4)
    heads = pd.DataFrame(
        {"head": summary["head"], "position": position, "score": summary["score"],
         "baseline": summary["baseline_score"]}
    )  # fmt: skip
    lift = pd.DataFrame({"head": summary["head"], "position": position})
    for col in ("lift_easy", "lift_hard"):
        lift[col] = summary.get(col, np.nan)
    hist = pd.DataFrame({"bin": ((HIST_BINS[:-1] + HIST_BINS[1:]) / 2).round(3)})
    for name, col in (("explanation", "score"), ("baseline", "baseline_score")):
        v = summary[col].to_numpy(dtype=float)
        hist[name] = np.histogram(np.clip(v[np.isfinite(v)], -1, 1), bins=HIST_BINS)[0]
    layers = (
        summary.groupby("layer", sort=True)[["score", "baseline_score"]]
        .mean()
        .rename(columns={"baseline_score": "baseline"})
        .reset_index()
    )
    files = {"head_scores.csv": heads, "head_lift.csv": lift, "score_hist.csv": hist,
             "layer_means.csv": layers}  # fmt: skip
    assert set(files) == set(PLOTS), "graph.PLOTS and the files written must agree"
    for name, df in files.items():
        _write_csv(df, folder / name)
    return [folder / n for n in files]


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
