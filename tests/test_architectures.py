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
from hf_reference import check_cache_against_hf

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
    n_layers, n_heads, separate_v = check_cache_against_hf(path, out, CANDIDATES, PER_WINDOW)
    assert separate_v == (arch in ("llama", "gemma3"))
    raw = pd.read_parquet(out / "raw_events.parquet")
    assert (raw["kind"] == "random").sum() == 2 * n_layers * n_heads


def test_hook_order_does_not_matter(tiny_model, smol_tokenizer):
    """Hooks arriving z → v → pattern (as some bridges fire them) give the same result."""
    from head_explain.attention_math import token_masks
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


def test_sync_waits_on_cuda_devices_only(monkeypatch):
    """The timing sync of the cache (and bench_cache) calls CUDA only for a CUDA device;
    checked here without a GPU by recording the call."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    sync(torch.device("cpu"))
    assert calls == []
    sync(torch.device("cuda", 0))
    assert calls == [torch.device("cuda", 0)]
