"""Paired real-vs-baseline statistics (head_explain.headline)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from head_explain.headline import paired_stats


def test_pairs_only_heads_with_both_numbers():
    real = [0.5, 0.4, np.nan, 0.9, None]
    base = [0.1, 0.5, 0.2, np.nan, 0.3]
    s = paired_stats(real, base, seed=1)
    assert s["n"] == 2 and s["n_missing"] == 3
    assert s["mean_real"] == pytest.approx(0.45) and s["mean_baseline"] == pytest.approx(0.3)
    assert s["mean_diff"] == pytest.approx(0.15) and s["share_above"] == 0.5
    assert s["ci_low"] <= s["mean_diff"] <= s["ci_high"]


def test_bootstrap_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(0)
    real = rng.normal(0.3, 0.1, 60)
    base = rng.normal(0.0, 0.1, 60)
    a, b = paired_stats(real, base, seed=3), paired_stats(real, base, seed=3)
    assert a == b
    assert 0.2 < a["ci_low"] < a["mean_diff"] < a["ci_high"] < 0.4
    assert a["share_above"] > 0.9
    assert paired_stats(real, base, seed=4)["ci_low"] != a["ci_low"]


def test_degenerate_inputs_give_none_not_nan():
    empty = paired_stats([np.nan], [0.1])
    assert empty["n"] == 0 and empty["mean_diff"] is None and empty["ci_low"] is None
    one = paired_stats([0.4], [0.1])
    assert one["n"] == 1 and one["mean_diff"] == pytest.approx(0.3) and one["ci_low"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in one.values())
    with pytest.raises(ValueError, match="2 real values vs 1"):
        paired_stats([1, 2], [1])
