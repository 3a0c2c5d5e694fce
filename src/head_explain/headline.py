"""The headline of a run: how often an explanation says more than a template.

`beats_baselines(scores)`: the fraction of heads whose explanation's pair-AUC is above
both the best template's and the shuffled explanation's, on one negative set, with a
percentile bootstrap 95% interval over heads. Heads whose three AUCs are not all
defined are left out and counted, never scored as losses or wins.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def beats_baselines(
    scores: pd.DataFrame, negatives: str = "easy", n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    cols = [f"pair_auc_{negatives}", f"template_auc_{negatives}", f"shuffled_auc_{negatives}"]
    if not set(cols) <= set(scores.columns):
        return {"fraction": math.nan, "ci95": [math.nan, math.nan], "n_heads": 0,
                "n_undefined": len(scores), "why": "scores have no pair-AUC columns"}  # fmt: skip
    df = scores[cols].astype(float)
    ok = df.notna().all(axis=1)
    d = df[ok]
    wins = ((d[cols[0]] > d[cols[1]]) & (d[cols[0]] > d[cols[2]])).to_numpy(float)
    out: dict[str, Any] = {"negatives": negatives, "n_heads": int(ok.sum()),
                           "n_undefined": int((~ok).sum())}  # fmt: skip
    if not len(wins):
        return out | {"fraction": math.nan, "ci95": [math.nan, math.nan],
                      "why": "no head has all three pair-AUCs"}  # fmt: skip
    rng = np.random.default_rng(seed)
    boot = rng.choice(wins, size=(n_boot, len(wins)), replace=True).mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return out | {"fraction": round(float(wins.mean()), 4),
                  "ci95": [round(float(lo), 4), round(float(hi), 4)]}  # fmt: skip
