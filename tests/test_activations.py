"""Activation maths checked against a direct computation from the attention pattern."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from head_explain.activations import (
    CacheSettings,
    HeadActivationCache,
    choose_random_windows,
    sync,
)
from head_explain.attention_math import head_writes, token_masks, write_norm_factor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def windows(smol_tokenizer):
    texts = [
        "The cat sat on the mat. The cat sat on the mat again, and the dog watched.",
        "def f(x):\n    return (x + 1) * (x - 1)\n\nprint(f(3), f(4), f(5))",
        "Paris is the capital of France. Berlin is the capital of Germany. Rome is",
        "one two three four five six seven eight nine ten one two three four five",
        "In 1905 Einstein published four papers; the third, on relativity, changed",
        "She said: 'It is late.' He said: 'It is early.' They said nothing at all.",
    ]
    n = 14
    rows = []
    for t in texts:
        ids = smol_tokenizer(t, add_special_tokens=False).input_ids[: n - 1]
        assert len(ids) == n - 1
        rows.append([smol_tokenizer.bos_token_id, *ids])
    return np.array(rows)


def _direct(bridge, tokens, layer):
    """pattern, v and W_O straight from the hooks, no code under test involved."""
    got = {}

    def keep(name):
        def hook(t, hook):
            got[name] = t.detach().clone()
            return t

        return hook

    with torch.inference_mode():
        bridge.run_with_hooks(
            torch.as_tensor(tokens),
            fwd_hooks=[
                (f"blocks.{layer}.attn.hook_pattern", keep("pattern")),
                (f"blocks.{layer}.attn.hook_v", keep("v")),
                (f"blocks.{layer}.attn.hook_z", keep("z")),
            ],
            return_type=None,
        )
    return got["pattern"], got["v"], got["z"], bridge.W_O[layer].detach()


def test_write_norm_equals_pattern_times_values(smol_bridge, windows):
    layer = 5
    pattern, v, z, w_o = _direct(smol_bridge, windows, layer)
    group = smol_bridge.cfg.n_heads // v.shape[2]
    v_q = v.repeat_interleave(group, dim=2)  # GQA: head h reads KV head h // group
    # z must be the attention-weighted sum of values: the hook semantics we rely on.
    z_direct = torch.einsum("bhts,bshd->bthd", pattern, v_q)
    torch.testing.assert_close(z, z_direct, atol=1e-4, rtol=1e-3)
    act, vnorm = head_writes(pattern, z, v_q, w_o)
    b, t, h = 2, 9, 4
    direct = torch.linalg.vector_norm(
        sum(pattern[b, h, t, s] * v_q[b, s, h] for s in range(t + 1)) @ w_o[h]
    )
    assert act[b, h, t].item() == pytest.approx(direct.item(), rel=1e-4)
    assert vnorm[b, h, 3].item() == pytest.approx(
        torch.linalg.vector_norm(v_q[b, 3, h] @ w_o[h]).item(), rel=1e-4
    )


def test_token_masks_on_a_known_sequence():
    tokens = torch.tensor([[0, 5, 6, 7, 5, 6]])
    dup, ind = token_masks(tokens)
    assert dup[0, 4].nonzero().flatten().tolist() == [1]  # 5 seen at 1
    assert dup[0, 5].nonzero().flatten().tolist() == [2]
    assert ind[0, 4].nonzero().flatten().tolist() == [2]  # after the earlier 5 came 6 (pos 2)
    assert ind[0, 5].nonzero().flatten().tolist() == [3]
    assert not dup[0, :4].any()


def test_streaming_cache_matches_brute_force(smol_bridge, windows):
    layer, heads = 3, [(3, 0), (3, 7), (20, 2)]
    settings = CacheSettings(
        candidates=8, max_events_per_window=2, top_sources=3, batch_size=4,
        random_window_ids=choose_random_windows(len(windows), 2, 0),
    )  # fmt: skip
    res = HeadActivationCache(smol_bridge, heads, settings).run(
        windows, np.arange(len(windows)), progress=False
    )
    pattern, v, z, w_o = _direct(smol_bridge, windows, layer)
    v_q = v.repeat_interleave(smol_bridge.cfg.n_heads // v.shape[2], dim=2)
    act, vnorm = head_writes(pattern, z, v_q, w_o)
    for head in (0, 7):
        a = act[:, head, 1:].numpy()  # statistics: every destination but BOS
        e = act[:, head, 2:].numpy()  # events: from min_event_pos (2) on
        # brute force: 2 best per window, then the 8 best overall
        per_window = [
            (e[w, p], w, p + 2) for w in range(len(windows)) for p in np.argsort(-e[w])[:2]
        ]
        best = sorted(per_window, reverse=True)[:8]
        got = res.raw_events.query("layer == @layer and head == @head and kind == 'top'")
        assert got["act"].to_numpy() == pytest.approx([b[0] for b in best], rel=1e-4)
        assert list(zip(got["window_id"], got["pos"], strict=True)) == [(b[1], b[2]) for b in best]
        # sources: top pattern * value-write norm of the first event
        ev = got.iloc[0]
        pair = pattern[ev.window_id, head, ev.pos] * vnorm[ev.window_id, head]
        assert list(ev.src_pos) == pair.topk(3).indices.tolist()
        # statistics over all non-BOS destinations
        st = res.head_stats.query("layer == @layer and head == @head").iloc[0]
        assert st.mean_act == pytest.approx(a.mean(), rel=1e-4)
        assert st.max_act == pytest.approx(a.max(), rel=1e-4)
        assert st.bos_frac == pytest.approx(pattern[:, head, 1:, 0].mean().item(), rel=1e-4)
        prev = torch.stack([pattern[:, head, t, t - 1] for t in range(2, windows.shape[1])], 1)
        assert st.prev_token == pytest.approx(prev.mean().item(), rel=1e-4)
    # every head has its random events and activation rows
    assert (res.raw_events["kind"] == "random").sum() == 2 * len(heads)
    rows = res.activations.query("layer == 3 and head == 0")
    row = rows.iloc[0]
    assert np.asarray(row.acts) == pytest.approx(act[row.window_id, 0].numpy(), rel=1e-2)


def test_write_norm_factor_keeps_every_norm():
    torch.manual_seed(0)
    w_o = torch.randn(3, 16, 80)  # [h, d_head, d_model]
    factor = write_norm_factor(w_o)
    assert factor.shape == (3, 16, 16)
    x = torch.randn(5, 7, 3, 16)
    want = torch.einsum("bphd,hdm->bhpm", x.double(), w_o.double()).norm(dim=-1)
    got = torch.einsum("bphd,hdm->bhpm", x, factor).norm(dim=-1)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)


def test_half_precision_model_on_cpu_tracks_float32(smol_bridge, windows):
    """The dtype path CUDA's bfloat16 takes (casts, W_O factor from bf16 weights), on CPU."""
    from head_explain.models import load_bridge

    heads = [(2, 1), (2, 4), (9, 0)]
    # more candidate slots than events (6 windows x 2): empty slots must never surface
    settings = CacheSettings(candidates=20, max_events_per_window=2, top_sources=3, batch_size=4)
    bf16, _ = load_bridge("smollm2-135m-instruct", "cpu", "bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = np.arange(len(windows))
    ref = HeadActivationCache(smol_bridge, heads, settings).run(windows, ids, progress=False)
    low = HeadActivationCache(bf16, heads, settings).run(windows, ids, progress=False)
    sync(next(bf16.parameters()).device)
    assert low.raw_events["act"].dtype == np.float32
    for (layer, head), got in low.raw_events.groupby(["layer", "head"]):  # noqa: B007 (read by query)
        assert len(got) == 2 * len(windows) and np.isfinite(got["act"]).all()
        r = ref.raw_events
        want = r[(r["layer"] == layer) & (r["head"] == head)]
        # bfloat16 keeps 8 bits of mantissa: the strongest event within a few percent
        assert got["act"].max() == pytest.approx(want["act"].max(), rel=0.05)
