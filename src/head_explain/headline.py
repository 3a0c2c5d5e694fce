"""Paired statistics of a per-head score against its per-head baseline.

A mean of real scores next to a mean of baseline scores says nothing when the two are
taken over different heads (a head whose simulation is constant has no score but may
have a baseline, and the other way round). Every comparison here is paired: only heads
with both numbers count, the rest are reported as `n_missing`, and the uncertainty of
the mean difference is a seeded percentile bootstrap over heads.

`beats_baselines(scores)`: the fraction of heads whose explanation's pair-AUC is above
both the best template's and the shuffled explanation's, on one negative set, with the
same bootstrap interval. Heads whose three AUCs are not all defined are left out and
counted, never scored as losses or wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

N_BOOT = 2000
CI = 0.95


def _as_float(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=float)
    for i, v in enumerate(values):
        try:
            out[i] = float(v) if v is not None else np.nan
        except (TypeError, ValueError):
            out[i] = np.nan
    return out


def paired_stats(
    real: Sequence[Any] | np.ndarray,
    baseline: Sequence[Any] | np.ndarray,
    seed: int = 0,
    n_boot: int = N_BOOT,
) -> dict[str, Any]:
    """Real vs baseline over the heads that have both (finite) numbers.

    Returns n (paired heads), n_missing (heads lacking one of the two), mean_real and
    mean_baseline over the same n heads, mean_diff (mean of real - baseline), ci_low /
    ci_high (percentile bootstrap 95% interval of mean_diff, resampling heads; None for
    n < 2), share_above (fraction of paired heads with real > baseline), n_boot, seed.
    Every number is a plain float or None, never NaN, so it is JSON-safe as is.
    """
    r, b = _as_float(real), _as_float(baseline)
    if r.shape != b.shape:
        raise ValueError(f"paired_stats: {r.size} real values vs {b.size} baseline values")
    ok = np.isfinite(r) & np.isfinite(b)
    n = int(ok.sum())
    out: dict[str, Any] = {
        "n": n, "n_missing": int(r.size - n), "mean_real": None, "mean_baseline": None,
        "mean_diff": None, "ci_low": None, "ci_high": None, "share_above": None,
        "n_boot": int(n_boot), "seed": int(seed),
    }  # fmt: skip
    if n == 0:
        return out
    diff = r[ok] - b[ok]
    out.update(
        mean_real=float(r[ok].mean()),
        mean_baseline=float(b[ok].mean()),
        mean_diff=float(diff.mean()),
        share_above=float((diff > 0).mean()),
    )
    if n >= 2 and n_boot > 0:
        out.update(zip(("ci_low", "ci_high"), bootstrap_ci(diff, seed, n_boot), strict=True))
    return out


def bootstrap_ci(values: np.ndarray, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of `values` (resampling heads)."""
    rng = np.random.default_rng([int(seed), 2024])
    idx = rng.integers(0, len(values), size=(int(n_boot), len(values)))
    means = values[idx].mean(axis=1)
    alpha = (1 - CI) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def beats_baselines(
    scores: pd.DataFrame, negatives: str = "easy", n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, Any]:
    """Share of heads whose explanation's pair-AUC beats both baselines, with its CI."""
    cols = [f"pair_auc_{negatives}", f"template_auc_{negatives}", f"shuffled_auc_{negatives}"]
    if not set(cols) <= set(scores.columns):
        return {"fraction": None, "ci95": [None, None], "n_heads": 0,
                "n_undefined": len(scores), "why": "scores have no pair-AUC columns"}  # fmt: skip
    df = scores[cols].astype(float)
    ok = df.notna().all(axis=1)
    d = df[ok]
    wins = ((d[cols[0]] > d[cols[1]]) & (d[cols[0]] > d[cols[2]])).to_numpy(float)
    out: dict[str, Any] = {"negatives": negatives, "n_heads": int(ok.sum()),
                           "n_undefined": int((~ok).sum())}  # fmt: skip
    if not len(wins):
        return out | {"fraction": None, "ci95": [None, None],
                      "why": "no head has all three pair-AUCs"}  # fmt: skip
    lo, hi = bootstrap_ci(wins, seed, n_boot)
    return out | {"fraction": round(float(wins.mean()), 4), "ci95": [round(lo, 4), round(hi, 4)]}
