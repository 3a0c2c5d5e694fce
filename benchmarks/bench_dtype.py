"""What a half-precision subject model does to patterns and top events, against float32.

    .venv/bin/python benchmarks/bench_dtype.py [--windows 48] [--window-len 192] \
        [--sources wikitext --wikitext-dir ../shared/data/wikitext \
         --wikitext-config wikitext-2-raw-v1 --wikitext-split test]

Runs on CPU (the same kernels' rounding as on GPU up to accumulation order). For each
dtype (bfloat16, float16): max and mean absolute error of every attention pattern
(all layers and heads) against float32, and per head the overlap of the top-event sets
(window, position) of the cache stage, |A ∩ B| / |A|. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from bench_cache import sample_windows  # noqa: E402

from head_explain.activations import CacheSettings, HeadActivationCache  # noqa: E402


def load(dtype: torch.dtype):
    """The bundled model as a bridge in `dtype` on CPU (float16 bypasses the CPU check)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from head_explain.models import BUNDLED, BUNDLED_HF_ID, bundled_hf_dir, load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(bundled_hf_dir(), dtype=dtype)
    return TransformerBridge.boot_transformers(
        BUNDLED_HF_ID, hf_model=hf, tokenizer=load_tokenizer(BUNDLED), device="cpu", dtype=dtype
    ).eval()


def patterns(bridge, tokens: np.ndarray) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    hooks = [
        (f"blocks.{layer}.attn.hook_pattern", lambda t, hook: got.append(t.float().clone()))
        for layer in range(bridge.cfg.n_layers)
    ]
    with torch.inference_mode():
        for i in range(0, len(tokens), 8):
            bridge.run_with_hooks(
                torch.as_tensor(tokens[i : i + 8]), fwd_hooks=hooks, return_type=None
            )
    return got


def top_sets(bridge, tokens: np.ndarray, candidates: int) -> dict[tuple[int, int], set]:
    heads = [(layer, h) for layer in range(bridge.cfg.n_layers) for h in range(bridge.cfg.n_heads)]
    settings = CacheSettings(
        candidates=candidates, max_events_per_window=3, top_sources=3, batch_size=8
    )
    raw = (
        HeadActivationCache(bridge, heads, settings)
        .run(tokens, np.arange(len(tokens)), progress=False)
        .raw_events
    )
    return {
        k: set(zip(g["window_id"], g["pos"], strict=True))
        for k, g in raw.groupby(["layer", "head"])
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--window-len", type=int, default=192)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--sources", default="pydocs")
    ap.add_argument("--wikitext-dir", default="")
    ap.add_argument("--wikitext-config", default="")
    ap.add_argument("--wikitext-split", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        windows = pd.read_parquet(sample_windows(args, args.windows, Path(tmp)))
    tokens = np.stack(windows["tokens"].to_numpy())
    ref = load(torch.float32)
    ref_pat, ref_top = patterns(ref, tokens), top_sets(ref, tokens, args.candidates)
    del ref
    print(
        f"{len(tokens)} windows x {tokens.shape[1]} tokens, top {args.candidates} events per head"
    )
    for dtype in (torch.bfloat16, torch.float16):
        bridge = load(dtype)
        err = [(p - r).abs() for p, r in zip(patterns(bridge, tokens), ref_pat, strict=True)]
        top = top_sets(bridge, tokens, args.candidates)
        overlap = np.array([len(top[k] & ref_top[k]) / len(ref_top[k]) for k in ref_top])
        print(
            f"{str(dtype).removeprefix('torch.'):>9}: pattern abs error max "
            f"{max(e.max().item() for e in err):.4f} mean {np.mean([e.mean().item() for e in err]):.2e}"
            f" | top-event overlap per head mean {overlap.mean():.3f} median "
            f"{np.median(overlap):.3f} min {overlap.min():.3f}, heads below 0.9: "
            f"{(overlap < 0.9).sum()}/{len(overlap)}",
            flush=True,
        )  # fmt: skip
        del bridge


if __name__ == "__main__":
    main()
