"""Head taxonomy against a direct computation from HF eager `output_attentions`.

Tiny random-weight GPT-2 and Llama (GQA: 2 KV heads for 4 query heads) models are built
from configs here, saved with the bundled tokenizer and loaded through
head_explain.models like any local model. The reference scores are computed in this
file from the HF model's own attention weights, never from the project's hooks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from head_explain.head_types import (
    MAX_OFFSET,
    SYN_HALF,
    Thresholds,
    choose_heads_by_class,
    classify,
    head_types,
    synthetic_sequences,
)

pytestmark = pytest.mark.slow


def _save_tiny(kind: str, path, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4)
    else:
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        )  # fmt: skip
    cfg.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _eager_attentions(path, tokens: np.ndarray) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens), output_attentions=True)
    return [a.float() for a in out.attentions]  # per layer [b, h, dest, src]


def _reference(att: torch.Tensor, tokens: np.ndarray, syn_att: torch.Tensor) -> dict:
    """Scores of every head of one layer, by loops over positions (slow, obvious)."""
    att, syn_att = att.numpy(), syn_att.numpy()
    b, h, n, _ = att.shape
    ref: dict[str, np.ndarray] = {}
    half = SYN_HALF
    t2 = range(half + 1, 2 * half + 1)
    sb = syn_att.shape[0]
    ref["syn_prev"] = np.array(
        [np.mean([syn_att[i, k, t, t - 1] for i in range(sb) for t in t2]) for k in range(h)]
    )
    ref["syn_duplicate"] = np.array(
        [np.mean([syn_att[i, k, t, t - half] for i in range(sb) for t in t2]) for k in range(h)]
    )
    ref["syn_induction"] = np.array(
        [np.mean([syn_att[i, k, t, t - half + 1] for i in range(sb) for t in t2]) for k in range(h)]
    )
    dests = [(i, t) for i in range(b) for t in range(1, n)]
    ref["nat_self"] = np.array([np.mean([att[i, k, t, t] for i, t in dests]) for k in range(h)])
    ref["nat_bos"] = np.array([np.mean([att[i, k, t, 0] for i, t in dests]) for k in range(h)])
    ref["nat_prev"] = np.array(
        [np.mean([att[i, k, t, t - 1] for i, t in dests if t >= 2]) for k in range(h)]
    )
    dup_vals = [[] for _ in range(h)]
    for i, t in dests:
        srcs = [s for s in range(1, t) if tokens[i, s] == tokens[i, t]]
        if srcs:
            for k in range(h):
                dup_vals[k].append(float(sum(att[i, k, t, s] for s in srcs)))
    ref["nat_duplicate"] = np.array([np.mean(v) if v else np.nan for v in dup_vals])
    ref["mean_attn_dist"] = np.array(
        [np.mean([sum(att[i, k, t, s] * (t - s) for s in range(t + 1)) for i, t in dests])
         for k in range(h)]
    )  # fmt: skip
    for off in (0, 3):
        ref[f"offset_{off}"] = np.array(
            [np.mean([att[i, k, t, t - off] for i, t in dests if t - off >= 1]) for k in range(h)]
        )
    return ref


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_scores_match_hf_eager_attention(kind, tmp_path, smol_tokenizer):
    from head_explain.models import load_bridge

    path = tmp_path / kind
    _save_tiny(kind, path, smol_tokenizer)
    rng = np.random.default_rng(1)
    # Natural-like windows with repeats so duplicate/induction have destinations.
    base = rng.integers(300, 400, size=(3, 20))
    windows = np.concatenate([np.full((3, 1), smol_tokenizer.bos_token_id), base], 1)
    bridge, _ = load_bridge(str(path), "cpu", "float32")
    got = head_types(bridge, windows, smol_tokenizer.bos_token_id, Thresholds(), batch_size=2)
    assert len(got) == 2 * 4 and list(got["head_name"][:2]) == ["L0H0", "L0H1"]
    syn = synthetic_sequences(len(smol_tokenizer), smol_tokenizer.bos_token_id)
    nat_att, syn_att = _eager_attentions(path, windows), _eager_attentions(path, syn)
    for layer in range(2):
        ref = _reference(nat_att[layer], windows, syn_att[layer])
        rows = got[got["layer"] == layer].sort_values("head")
        for col, want in ref.items():
            np.testing.assert_allclose(
                rows[col].to_numpy(), want, rtol=1e-3, atol=1e-5, err_msg=col
            )
    assert set(got["head_class"]) <= {
        "previous_token", "induction", "duplicate_token", "self", "fixed_offset", "bos_sink",
        "content",
    }  # fmt: skip
    assert (got[[f"offset_{k}" for k in range(MAX_OFFSET + 1)]].to_numpy() <= 1 + 1e-6).all()


def test_synthetic_sequences_repeat_once():
    seqs = synthetic_sequences(50_000, 1, n_seqs=3, half=10, seed=4)
    assert seqs.shape == (3, 21) and (seqs[:, 0] == 1).all()
    assert (seqs[:, 1:11] == seqs[:, 11:]).all()
    assert all(len(set(row[1:11])) == 10 for row in seqs)
    assert (seqs == synthetic_sequences(50_000, 1, n_seqs=3, half=10, seed=4)).all()


def _row(**scores) -> dict:
    base = dict(
        layer=0, head=0, head_name="L0H0", syn_prev=0.0, syn_duplicate=0.0, syn_induction=0.0,
        nat_prev=0.0, nat_self=0.0, nat_bos=0.0, nat_duplicate=0.0, nat_induction=0.0,
        top_offset=2, top_offset_share=0.0, mean_attn_dist=1.0,
    )  # fmt: skip
    return base | scores


def test_class_rule():
    rows = pd.DataFrame(
        [
            _row(head=0, syn_prev=0.9, nat_prev=0.7),
            _row(head=1, syn_induction=0.5, syn_duplicate=0.35),
            _row(head=2, nat_bos=0.95),
            _row(head=3, nat_bos=0.95, nat_self=0.5),  # a template beats the sink
            _row(head=4, nat_self=0.1),
            _row(head=5, top_offset=3, top_offset_share=0.6),
        ]
    )
    out = classify(rows, Thresholds())
    assert list(out["head_class"]) == [
        "previous_token", "induction", "bos_sink", "self", "content", "fixed_offset",
    ]  # fmt: skip
    assert out["class_score"][0] == pytest.approx(0.8)
    assert out["second_class"][1] == "duplicate_token" and out["second_class"][3] == "bos_sink"
    picked = choose_heads_by_class(out, [(0, 0), (0, 4), (0, 2)], 5)
    assert len(picked) == 5 and (0, 1) in picked and (0, 5) in picked
