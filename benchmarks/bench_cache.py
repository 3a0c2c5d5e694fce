"""Benchmark the cache stage: hook overhead and memory growth, printed as ratios.

    .venv/bin/python benchmarks/bench_cache.py [--model smollm2-135m-instruct] [--device cpu]

1. Throughput: tokens/s of HeadActivationCache over all heads vs a plain forward pass
   of the same bridge on the same windows (ratio = cache time / forward time).
2. Memory: peak traced memory (tracemalloc, Python + numpy) and peak RSS growth of the
   streaming cache for N and 4N windows; the ratio should stay near 1 (memory does not
   grow with windows). On CUDA, torch's peak allocated memory is reported instead.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from head_explain.activations import CacheSettings, HeadActivationCache, choose_random_windows
from head_explain.heads import choose_heads
from head_explain.models import load_bridge


def windows(n: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 1, size=(n, length))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cache(bridge, tokens, heads, device) -> tuple[float, float]:
    settings = CacheSettings(
        candidates=100, max_events_per_window=2, top_sources=3, batch_size=8,
        random_window_ids=choose_random_windows(len(tokens), 8, 0),
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    HeadActivationCache(bridge, heads, settings).run(tokens, np.arange(len(tokens)), progress=False)
    secs = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()
    return secs, mem


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window-len", type=int, default=64)
    args = ap.parse_args()
    bridge, _ = load_bridge(args.model, args.device, "auto")
    device = next(bridge.parameters()).device.type
    heads = choose_heads(bridge.cfg.n_layers, bridge.cfg.n_heads, 10**6)
    vocab = bridge.cfg.d_vocab
    small = windows(args.windows, args.window_len, vocab)
    big = windows(4 * args.windows, args.window_len, vocab, seed=1)

    with torch.inference_mode():
        x = torch.as_tensor(small[:8], device=device)
        bridge(x, return_type=None)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(small), 8):
            bridge(torch.as_tensor(small[i : i + 8], device=device), return_type=None)
        fwd = time.perf_counter() - t0
    run_cache(bridge, small[:8], heads, device)  # warm-up
    cache_small, mem_small = run_cache(bridge, small, heads, device)
    cache_big, mem_big = run_cache(bridge, big, heads, device)
    tokens = small.size
    print(
        f"model {args.model} on {device}: {len(heads)} heads, {args.windows} windows x {args.window_len} tokens"
    )
    print(f"plain forward:        {tokens / fwd:8.0f} tokens/s")
    print(f"cache (all heads):    {tokens / cache_small:8.0f} tokens/s")
    print(f"cache / forward time: {cache_small / fwd:8.2f}x")
    print(f"4x windows time ratio: {cache_big / cache_small:7.2f} (linear = 4.00)")
    unit = "MiB allocated (cuda peak)" if device == "cuda" else "MiB peak RSS"
    print(
        f"memory {args.windows} windows: {mem_small:.0f} {unit}; {4 * args.windows} windows: {mem_big:.0f}"
    )
    print(f"memory ratio 4x windows: {mem_big / mem_small:.2f} (bounded = ~1.00)")


if __name__ == "__main__":
    main()
