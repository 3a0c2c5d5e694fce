"""Benchmark the cache stage against a plain forward pass: time, tokens/s and memory.

    .venv/bin/python benchmarks/bench_cache.py [--sizes 40,320] [--repeats 2] [--threads 1] \
        [--sources wikitext --wikitext-dir ../shared/data/wikitext \
         --wikitext-config wikitext-2-raw-v1 --wikitext-split test]

Windows are sampled once by the real sample stage (the largest size; smaller sizes take
its first windows). Then every (size, heads, repeat) runs in its own subprocess, so no
run inherits another's heap:
  1. load the model, one warm-up forward, free; RSS now is the model-loaded baseline;
  2. the cache stage (HeadActivationCache.run + the three parquet writes) on N windows;
  3. a plain forward of the same model (HF module, logits included) over the same
     batches, timed with the same synchronisation (torch.cuda.synchronize on GPU).
A thread samples RSS every 20 ms throughout (/proc/self/statm); the child reports the
peak minus the baseline, RSS at quarters of the cache phase (flat = memory does not
grow with windows) and, on CUDA, torch's peak allocated memory.

Heads: `all` (every head) and `early` (every head of the first third of the layers:
the forward can stop there), the latter at the first size only unless --subset-all-sizes.
Prints a table and ratios (cache time / forward time per token; peak at the largest
size / peak at the smallest). Asserts nothing: the numbers are the result.

GPU runs without the hub: `--random-config gpt2` (or gpt2-medium, gpt2-large, gpt2-xl)
builds a random-weight GPT-2 of that size from its HF config (seeded), saves it with
the bundled SmolLM2 tokenizer (its 49,152 ids fit GPT-2's vocabulary) in a temp folder
and measures that; e.g. on a GPU:
    bench_cache.py --random-config gpt2 --sizes 1500 --device cuda --no-subset
    bench_cache.py --random-config gpt2-xl --sizes 1500 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class RssSampler(threading.Thread):
    """Samples RSS every `every` seconds with the current phase label."""

    def __init__(self, every: float = 0.02, trace: str = ""):
        super().__init__(daemon=True)
        self.every, self.phase, self.samples = every, "load", []
        self.trace = open(trace, "w", buffering=1) if trace else None  # noqa: SIM115
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self._halt.is_set():
            sample = (time.perf_counter(), self.phase, rss_mb())
            self.samples.append(sample)
            if self.trace and len(self.samples) % 50 == 0:  # one line a second
                self.trace.write(f"{sample[0] - t0:.1f}\t{sample[1]}\t{sample[2]:.0f}\n")
            time.sleep(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def during(self, phase: str) -> list[float]:
        return [r for _, p, r in self.samples if p == phase]


# ---------------------------------------------------------------- child: one measurement
def child(args: argparse.Namespace) -> dict:
    sampler = RssSampler(trace=args.trace)
    sampler.start()
    import numpy as np
    import pandas as pd
    import torch

    from head_explain import artifacts as art
    from head_explain.activations import CacheSettings, HeadActivationCache, choose_random_windows

    try:
        from head_explain.activations import release_memory, sync
    except ImportError:  # an older library, for before/after comparisons
        import gc

        def release_memory() -> None:
            gc.collect()

        def sync(device) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    from head_explain.models import load_bridge

    if args.threads:
        torch.set_num_threads(args.threads)
    windows = pd.read_parquet(args.windows_file).iloc[: args.n]
    tokens = np.stack(windows["tokens"].to_numpy())
    ids = windows["window_id"].to_numpy()
    bridge, _ = load_bridge(args.model, args.device, args.dtype)
    device = next(bridge.parameters()).device
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    last = n_layers if args.heads == "all" else max(1, n_layers // 3)
    heads = [(layer, h) for layer in range(last) for h in range(n_heads)]
    hf = bridge.original_model
    bs = args.batch_size
    with torch.inference_mode():
        hf(torch.as_tensor(tokens[:bs], device=device).long())  # warm-up (kernels, pages)
    release_memory()
    time.sleep(0.2)
    baseline = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    sampler.phase = "cache"
    settings = CacheSettings(
        candidates=args.candidates, max_events_per_window=3, top_sources=3, batch_size=bs,
        random_window_ids=choose_random_windows(len(tokens), args.random_windows, 0),
    )  # fmt: skip
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    cache = HeadActivationCache(bridge, heads, settings)
    result = cache.run(tokens, ids, progress=bool(args.trace))
    sync(device)
    cache_s, cache_cpu = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("raw_events", "head_stats", "activations"):
            art.write_parquet(Path(tmp) / f"{name}.parquet", getattr(result, name), {})
    write_s = time.perf_counter() - t0 - cache_s
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    n_events = len(result.raw_events)
    del result
    release_memory()

    sampler.phase = "forward"
    fwd_tokens = tokens[: args.forward_windows or len(tokens)]
    with torch.inference_mode():
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(fwd_tokens), bs):
            hf(torch.as_tensor(fwd_tokens[i : i + bs], device=device).long())  # logits too
        sync(device)
        fwd_s, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    sampler.stop()

    cache_rss = sampler.during("cache")
    quarters = [
        cache_rss[min(len(cache_rss) - 1, int(q * len(cache_rss)))] for q in (0.25, 0.5, 0.75, 1.0)
    ]
    return {
        "n": args.n, "heads": args.heads, "n_heads": len(heads), "last_layer": last - 1,
        "device": str(device), "threads": torch.get_num_threads(), "events": n_events,
        "cache_s": cache_s, "write_s": write_s,
        "cache_tok_s": tokens.size / cache_s, "fwd_tok_s": fwd_tokens.size / fwd_s,
        "ratio": (cache_s / tokens.size) / (fwd_s / fwd_tokens.size),
        # CPU seconds (all threads): on a shared machine less noisy than wall time
        "cache_cpu_s": cache_cpu, "fwd_cpu_s": fwd_cpu,
        "cpu_ratio": (cache_cpu / tokens.size) / (fwd_cpu / fwd_tokens.size),
        "baseline_mb": baseline, "peak_mb": max(cache_rss, default=baseline),
        "growth_mb": max(cache_rss, default=baseline) - baseline,
        "rss_quarters_mb": [round(q - baseline) for q in quarters], "cuda_peak_mb": cuda_peak,
    }  # fmt: skip


# ---------------------------------------------------------------- parent
GPT2_SIZES = {  # (n_layer, n_head, n_embd) of the released checkpoints
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
}  # fmt: skip


def random_gpt2(size: str, folder: Path) -> Path:
    """A seeded random-weight GPT-2 of `size` saved in `folder`, with a local tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from head_explain.models import load_tokenizer

    n_layer, n_head, n_embd = GPT2_SIZES[size]
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(folder)
    return folder


def sample_windows(args: argparse.Namespace, n: int, outdir: Path) -> Path:
    from head_explain.cli import main

    flags = [
        "--model", args.model, "--windows", str(n), "--window-len", str(args.window_len),
        "--sources", args.sources, "--until", "sample", "--outdir", str(outdir),
    ]  # fmt: skip
    for key in ("wikitext_dir", "wikitext_config", "wikitext_split"):
        if getattr(args, key):
            flags += ["--" + key.replace("_", "-"), getattr(args, key)]
    if main(flags) != 0:
        sys.exit("sampling windows failed")
    return outdir / "windows.parquet"


def spawn(args: argparse.Namespace, windows_file: Path, n: int, heads: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", "--windows-file", str(windows_file), "--n", str(n),
        "--heads", heads, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
        "--batch-size", str(args.batch_size), "--candidates", str(args.candidates),
        "--random-windows", str(args.random_windows),
        "--forward-windows", str(args.forward_windows), "--threads", str(args.threads),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child failed ({n} windows, {heads}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--random-config", default="", choices=["", *GPT2_SIZES],
                    help="a random-weight GPT-2 of this size instead of --model")  # fmt: skip
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sizes", default="40,320", help="window counts: 1x and 8x")
    ap.add_argument("--window-len", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=500)
    ap.add_argument("--random-windows", type=int, default=60)
    ap.add_argument("--forward-windows", type=int, default=0, help="0: the same windows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    ap.add_argument("--subset-all-sizes", action="store_true")
    ap.add_argument("--no-subset", action="store_true")
    ap.add_argument("--sources", default="pydocs")
    ap.add_argument("--wikitext-dir", default="")
    ap.add_argument("--wikitext-config", default="")
    ap.add_argument("--wikitext-split", default="")
    ap.add_argument("--json", default="", help="also write every measurement here")
    ap.add_argument("--trace", default="", help="child: RSS over time to this file (tsv)")
    # child-only
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--windows-file", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--heads", default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_config:
            args.model = str(random_gpt2(args.random_config, Path(tmp) / args.random_config))
        windows_file = sample_windows(args, max(sizes), Path(tmp))
        for n in sizes:
            runs = (
                ["all"]
                if args.no_subset or (n != sizes[0] and not args.subset_all_sizes)
                else ["all", "early"]
            )
            for heads in runs:
                for _ in range(args.repeats):
                    r = spawn(args, windows_file, n, heads)
                    rows.append(r)
                    print(
                        f"{r['n']:>5} windows {r['heads']:>5} ({r['n_heads']} heads, last layer "
                        f"{r['last_layer']}): cache {r['cache_s']:6.1f}s {r['cache_tok_s']:6.0f} tok/s"
                        f" (+write {r['write_s']:.1f}s) | forward {r['fwd_tok_s']:6.0f} tok/s | "
                        f"cache/forward {r['ratio']:.2f}x (CPU time {r['cpu_ratio']:.2f}x) | RSS baseline {r['baseline_mb']:.0f} MB, "
                        f"peak {r['peak_mb']:.0f} MB (+{r['growth_mb']:.0f}), quarters "
                        f"{r['rss_quarters_mb']} | load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )  # fmt: skip
    alls = [r for r in rows if r["heads"] == "all"]
    lo = [r["growth_mb"] for r in alls if r["n"] == sizes[0]]
    hi = [r["growth_mb"] for r in alls if r["n"] == sizes[-1]]
    if len(sizes) > 1 and lo and hi:
        print(
            f"peak growth over baseline, all heads: {sizes[0]} windows {min(lo):.0f}-{max(lo):.0f} MB,"
            f" {sizes[-1]} windows {min(hi):.0f}-{max(hi):.0f} MB; ratio of means "
            f"{(sum(hi) / len(hi)) / max(sum(lo) / len(lo), 1e-9):.2f} (flat = 1.00)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
