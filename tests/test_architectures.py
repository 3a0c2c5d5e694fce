"""sample → cache on tiny random-weight models of several architectures, checked
against HF eager attention (`output_attentions`) and ‖z·W_O‖ taken from the input of
HF's own output projection — no code under test in the reference.

GPT-2 (LayerNorm, fused QKV, Conv1D projections), Llama with GQA (2 KV heads for 4
query heads), GPT-NeoX (parallel attention + MLP) and Gemma 3 (QK-norm, sliding and
global layers, multi-query attention). The bundled SmolLM2 tokenizer is saved beside
each model (vocab sizes match), so the pipeline runs on them like on any local model.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from head_explain.activations import CacheSettings, HeadActivationCache, sync
from head_explain.cli import main

pytestmark = pytest.mark.slow

WINDOWS, WINDOW_LEN, CANDIDATES, PER_WINDOW = 10, 24, 12, 2
# the attention output projection of one layer, named as each HF architecture names it
O_PROJ = re.compile(r"\.(\d+)\.(self_attn\.o_proj|attn\.c_proj|attention\.dense)$")
V_PROJ = re.compile(r"\.(\d+)\.self_attn\.v_proj$")  # separate V (Llama, Gemma): GQA check
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "river",
    "light",
    "moved",
    "over",
    "old",
    "stone",
    "bridges",
    "and",
    "quiet",
    "towns",
    "where",
    "people",
    "read",
    "books",
    "about",
    "history",
    "science",
    "music",
    "and",
    "the",
    "long",
    "winter",
    "nights",
]


def _corpus(folder) -> str:
    """Comma-separated .txt files of seeded word salad with repeats (for induction)."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(WINDOWS):
        words = list(rng.choice(WORDS, size=40))
        path = folder / f"doc{i}.txt"
        path.write_text(" ".join(words + words[:20]) + ".")
        names.append(str(path))
    return ",".join(names)


def _config(arch: str, vocab: int, bos: int, eos: int):
    from transformers import Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    small = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos)
    if arch == "gpt2":
        return GPT2Config(n_positions=64, n_embd=64, n_layer=3, n_head=4, **small)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **small,
        )  # fmt: skip
    if arch == "neox":
        return GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, **small,
        )  # fmt: skip
    cfg = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        pad_token_id=0, **small,
    )  # fmt: skip
    cfg.architectures = ["Gemma3ForCausalLM"]
    return cfg


@pytest.fixture(scope="module", params=["gpt2", "llama", "neox", "gemma3"])
def tiny_model(request, tmp_path_factory, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    tok = smol_tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        _config(request.param, len(tok), tok.bos_token_id, tok.eos_token_id)
    )
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return request.param, path


def _hf_reference(path, tokens: np.ndarray):
    """Eager attention patterns and per-head ‖z·W_O‖, straight from HF modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()
    n_heads = model.config.num_attention_heads
    o_in: dict[int, torch.Tensor] = {}
    v_out: dict[int, torch.Tensor] = {}
    projs = {}
    for name, module in model.named_modules():
        if m := V_PROJ.search(name):
            module.register_forward_hook(
                lambda mod, args, out, layer=int(m.group(1)): v_out.__setitem__(layer, out.detach())
            )
        if m := O_PROJ.search(name):
            layer = int(m.group(1))
            projs[layer] = module
            module.register_forward_pre_hook(
                lambda mod, args, layer=layer: o_in.__setitem__(layer, args[0].detach())
            )
    with torch.no_grad():
        out = model(torch.as_tensor(tokens), output_attentions=True)
    acts, vnorms = {}, {}
    for layer, proj in projs.items():
        w = proj.weight.detach().double()
        # Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
        w_in_out = w if type(proj).__name__ == "Conv1D" else w.T
        d_head = w_in_out.shape[0] // n_heads
        w_o = w_in_out.reshape(n_heads, d_head, -1)  # [h, d_head, d_model]
        z = o_in[layer].double().reshape(*o_in[layer].shape[:2], n_heads, d_head)
        acts[layer] = torch.einsum("bthd,hdm->bhtm", z, w_o).norm(dim=-1)  # [b, h, t]
        if layer in v_out:  # HF's repeat_kv: query head h reads KV head h // group
            v = v_out[layer].double().reshape(*z.shape[:2], -1, d_head)
            v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
            vnorms[layer] = torch.einsum("bshd,hdm->bhsm", v, w_o).norm(dim=-1)  # [b, h, s]
    return [a.double() for a in out.attentions], acts, vnorms


def test_cache_matches_hf_eager(tiny_model, tmp_path):
    arch, path = tiny_model
    out = tmp_path / "out"
    args = [
        "--model", str(path), "--sources", "files", "--data-files", _corpus(tmp_path),
        "--windows", str(WINDOWS),
        "--window-len", str(WINDOW_LEN), "--candidates", str(CANDIDATES), "--topk", "8",
        "--max-events-per-window", str(PER_WINDOW), "--random-windows", "2",
        "--batch-size", "4", "--device", "cpu", "--dtype", "float32",
        "--until", "cache", "--outdir", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    windows = pd.read_parquet(out / "windows.parquet")
    raw = pd.read_parquet(out / "raw_events.parquet")
    stats = pd.read_parquet(out / "head_stats.parquet")
    tokens = np.stack(windows["tokens"].to_numpy())
    row_of = {int(w): i for i, w in enumerate(windows["window_id"])}
    attn, acts, vnorms = _hf_reference(path, tokens)
    assert bool(vnorms) == (arch in ("llama", "gemma3"))
    n_layers, n_heads = len(attn), attn[0].shape[1]
    top = raw[raw["kind"] == "top"]
    assert top.groupby(["layer", "head"]).ngroups == n_layers * n_heads
    for (layer, head), events in top.groupby(["layer", "head"]):
        ref = acts[layer][:, head]  # [b, t]
        got_rows = [row_of[w] for w in events["window_id"]]
        want = ref[got_rows, events["pos"].to_numpy()].numpy()
        np.testing.assert_allclose(events["act"], want, rtol=5e-6, atol=1e-9)
        # the events are the true top: best PER_WINDOW non-BOS tokens per window, best overall
        per_window = ref[:, 1:].topk(PER_WINDOW, dim=1).values.flatten()
        best = per_window.sort(descending=True).values[:CANDIDATES].numpy()
        np.testing.assert_allclose(events["act"].to_numpy(), best, rtol=5e-6)
        # main source: its attention weight is HF's
        src = np.array([s[0] for s in events["src_pos"]])
        want_attn = attn[layer][got_rows, head, events["pos"].to_numpy(), src].numpy()
        got_attn = np.array([a[0] for a in events["src_attn"]])
        np.testing.assert_allclose(got_attn, want_attn, rtol=5e-6, atol=1e-8)
        if layer in vnorms:  # main source = argmax attention × ‖v·W_O‖, with GQA's KV head
            pair = (
                attn[layer][got_rows, head, events["pos"].to_numpy()]
                * vnorms[layer][got_rows, head]
            )
            np.testing.assert_array_equal(src, pair.argmax(-1).numpy())
            got_write = np.array([w[0] for w in events["src_write"]])
            np.testing.assert_allclose(got_write, pair.max(-1).values.numpy(), rtol=5e-6)
        st = stats[(stats["layer"] == layer) & (stats["head"] == head)].iloc[0]
        bos = attn[layer][:, head, 1:, 0].mean().item()
        assert st.bos_frac == pytest.approx(bos, rel=1e-5)
        assert st.mean_act == pytest.approx(ref[:, 1:].mean().item(), rel=1e-5)
    assert (raw["kind"] == "random").sum() == 2 * n_layers * n_heads


def test_hook_order_does_not_matter(tiny_model, smol_tokenizer):
    """Hooks arriving z → v → pattern (as some bridges fire them) give the same result."""
    from head_explain.activations import token_masks
    from head_explain.models import load_bridge

    _, path = tiny_model
    bridge, _ = load_bridge(str(path), "cpu", "float32")
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 5000, size=(6, 16))
    heads = [(layer, h) for layer in range(bridge.cfg.n_layers) for h in (0, 3)]
    settings = CacheSettings(candidates=5, max_events_per_window=2, top_sources=2, batch_size=3)
    forward = HeadActivationCache(bridge, heads, settings).run(tokens, np.arange(6), progress=False)

    captured: dict[tuple[int, str], torch.Tensor] = {}
    names = [
        (f"blocks.{layer}.attn.hook_{role}", layer, role)
        for layer in range(bridge.cfg.n_layers)
        for role in ("pattern", "v", "z")
    ]
    replay = HeadActivationCache(bridge, heads, settings)
    replay._n_tokens = tokens.shape[1]
    for start in range(0, 6, 3):
        batch = torch.as_tensor(tokens[start : start + 3])
        hooks = [
            (n, lambda t, hook, k=(layer, role): captured.__setitem__(k, t.clone()))
            for n, layer, role in names
        ]
        with torch.inference_mode():
            bridge.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
            replay._batch = (batch, torch.arange(start, start + 3), *token_masks(batch))
            replay._done.clear()
            for layer in reversed(range(bridge.cfg.n_layers)):  # late layers first, z first
                for role in ("z", "v", "pattern"):
                    try:
                        replay._arrive(layer, role, captured[layer, role], None)
                    except Exception as exc:  # the early stop after the last layer
                        assert type(exc).__name__ == "StopAtLayerException"
    result = replay._collect()
    for name in ("raw_events", "head_stats", "activations"):
        pd.testing.assert_frame_equal(getattr(result, name), getattr(forward, name))
    # every buffer stays on the model's device (the CUDA path moves nothing else)
    assert all(t.vals.device == next(bridge.parameters()).device for t in replay.top.values())
    sync(next(bridge.parameters()).device)


def test_auto_dtype_is_float32_on_every_device():
    """bfloat16 changed some heads' top events (benchmarks/bench_dtype.py): never implicit."""
    from head_explain.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.float32  # decided without touching a GPU
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
