"""Event selection: held-out windows, splits, excerpts, normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from head_explain.select import SelectSettings, excerpt_bounds, select_events, spread

T = 30


def _fixture(n_windows=20, heads=((0, 0), (1, 2))):
    rng = np.random.default_rng(0)
    windows = pd.DataFrame(
        dict(
            window_id=range(n_windows),
            tokens=[list(range(100 + w, 100 + w + T)) for w in range(n_windows)],
        )
    )
    raw, acts = [], []
    for layer, head in heads:
        for w in range(n_windows):
            a = rng.random(T).astype(np.float32)
            acts.append(dict(layer=layer, head=head, window_id=w, acts=a))
            for p in np.argsort(-a[1:])[:2] + 1:
                raw.append(dict(layer=layer, head=head, window_id=w, pos=int(p), act=float(a[p]),
                                kind="top", src_pos=[int(p) - 1, 0], src_attn=[0.5, 0.2], src_write=[1.0, 0.1]))  # fmt: skip
        for w in (15, 16, 17, 18, 19):
            raw.append(dict(layer=layer, head=head, window_id=w, pos=5, act=0.1, kind="random",
                            src_pos=[4], src_attn=[1.0], src_write=[0.1]))  # fmt: skip
    return pd.DataFrame(raw), windows, pd.DataFrame(acts)


def _strs(ids) -> list[str]:
    return [str(t) for t in ids]


S = SelectSettings(
    topk=24, explain_examples=6, score_top_examples=3, score_random_examples=2, excerpt_len=8
)


def test_splits_never_share_windows_and_are_deterministic():
    raw, windows, acts = _fixture()
    ev = select_events(raw, windows, acts, _strs, S)
    ev2 = select_events(raw, windows, acts, _strs, S)
    pd.testing.assert_frame_equal(ev, ev2)
    for _, g in ev.groupby(["layer", "head"]):
        w = {s: set(g[g.split == s].window_id) for s in ("explain", "score_top", "score_random")}
        assert not (w["explain"] & w["score_top"]) and not (w["explain"] & w["score_random"])
        assert not (w["score_top"] & w["score_random"])
        assert (g.split == "explain").sum() == 6
        assert (g.split == "score_top").sum() == 3 and len(w["score_top"]) == 3
        assert (g.split == "score_random").sum() == 2
        top = g[g.split != "score_random"]
        # the strongest event of the top-k pool is either explained or held out
        pool = raw[
            (raw.layer == g.layer.iloc[0])
            & (raw["head"] == g["head"].iloc[0])
            & (raw.kind == "top")
        ]
        assert pool.act.max() == pytest.approx(top.act.max())
        for split in ("explain", "score_top"):
            part = g[g.split == split].sort_values("rank")
            assert part.act.is_monotonic_decreasing
    other = select_events(raw, windows, acts, _strs, SelectSettings(**{**S.__dict__, "seed": 1}))
    assert not other.equals(ev)


def test_excerpts_and_normalisation():
    raw, windows, acts = _fixture()
    ev = select_events(raw, windows, acts, lambda ids: [f"<{t}>" for t in ids], S)
    for r in ev.itertuples():
        assert len(r.excerpt_tokens) == len(r.excerpt_acts) == 8
        tok = windows.tokens[r.window_id][r.pos]
        assert r.excerpt_tokens[r.excerpt_dest] == f"<{tok}>"
        true = acts[
            (acts.layer == r.layer) & (acts["head"] == r.head) & (acts.window_id == r.window_id)
        ].acts.iloc[0]
        assert r.excerpt_acts[r.excerpt_dest] == pytest.approx(true[r.pos])
        assert 0 <= r.act_norm <= 10
    assert ev.groupby(["layer", "head"]).act_norm.max().round(6).eq(10).all()


def test_excerpt_bounds_and_spread():
    assert excerpt_bounds(pos=3, n_tokens=30, excerpt_len=8, tail=4) == (1, 9)
    assert excerpt_bounds(pos=28, n_tokens=30, excerpt_len=8, tail=4) == (22, 30)
    assert excerpt_bounds(pos=15, n_tokens=30, excerpt_len=8, tail=2) == (10, 18)
    # a source to show: the excerpt starts one token before it, within 3 x excerpt_len
    assert excerpt_bounds(pos=15, n_tokens=30, excerpt_len=8, tail=2, reach_back_to=4) == (3, 18)
    assert excerpt_bounds(pos=15, n_tokens=30, excerpt_len=8, tail=2, reach_back_to=1) == (1, 18)
    assert excerpt_bounds(pos=28, n_tokens=40, excerpt_len=8, tail=2, reach_back_to=5) == (23, 31)
    assert excerpt_bounds(pos=15, n_tokens=30, excerpt_len=8, tail=2, reach_back_to=12) == (10, 18)
    assert excerpt_bounds(pos=15, n_tokens=30, excerpt_len=8, tail=2, reach_back_to=0) == (10, 18)
    assert spread(10, 4) == [0, 3, 6, 9]
    assert spread(3, 5) == [0, 1, 2]
