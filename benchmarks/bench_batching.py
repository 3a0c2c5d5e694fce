"""Benchmark: per-token simulation with one excerpt per request against several, same heads.

    .venv/bin/python benchmarks/bench_batching.py [--prepared outputs] [--per-request 1,3,6]
        [--llm embedded|server] [--method echo|chat] [--before] [--heads 18]

Reads events.parquet and explanations.jsonl of a finished run (default: the demo's
outputs/) and, for each `excerpts_per_request` setting, simulates every explained head's
scoring excerpts with its explanation and its shuffled baseline (simulate.score_head, as
the stage does), LLM cache off, each setting in its own process (no shared warm state).
`--llm embedded`: the bundled SmolLM2 in-process; `--llm server`: the real llama.cpp
server (tests/llama_server.py), `--method chat` or `echo`.

Prints per setting: requests, wall time, mean score and mean baseline over the same heads,
and against one excerpt per request: Pearson r of the per-head scores, mean |delta score|,
and r of the simulated per-token values (how much batching changes the predictions).
`--before` adds a run at 1 per request as the embedded backend ran before its speed-ups:
no shared-prefix KV cache, and (with --stages) no early stop of the explainer's
generation. Its outputs must equal the default run's up to float rounding; the max
difference is printed.

`--stages`: instead, the demo's whole explain + simulate stages (params.yaml, cache off,
pair judging included) on the prepared events, per setting; prints each stage's wall
time, the speed-up over the first setting and whether the explanations are the same.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HEAD_EXPLAIN_PROGRESS", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def child(args: argparse.Namespace) -> dict:
    import pandas as pd

    from head_explain import artifacts as art
    from head_explain import config, prompts, simulate
    from head_explain.heads import head_name
    from head_explain.llm import make_backend

    prepared = Path(args.prepared)
    events = pd.read_parquet(prepared / "events.parquet")
    expl = {(r["layer"], r["head"]): r["explanation"]
            for r in art.read_jsonl(prepared / "explanations.jsonl") if r["explanation"]}  # fmt: skip
    heads = sorted(expl)[: args.heads]
    cfg = config.build(dict(
        model="smollm2-135m-instruct", llm="embedded" if args.llm == "embedded" else "openai",
        openai_model="smollm2", openai_base_url=args.base_url, llm_cache="off",
        llm_concurrency=args.concurrency, excerpts_per_request=args.k, outdir=args.work,
    ))  # fmt: skip
    backend = make_backend(cfg, "simulator")
    if args.before:

        async def no_prefix(text: str) -> None:
            return None

        backend.share_prefix = no_prefix  # type: ignore[method-assign]
    template = prompts.load(simulate.ECHO_PROMPT if args.method == "echo" else simulate.CHAT_PROMPT)
    base = simulate.baseline_assignment(heads, 0)
    groups = {k: g for k, g in events.groupby(["layer", "head"], sort=True)}

    async def all_heads():
        if args.llm == "embedded":  # load the model before the clock starts
            from head_explain.llm.embedded import engine

            await asyncio.to_thread(engine)
        t0 = time.perf_counter()
        rows = await asyncio.gather(*(
            simulate.score_head(backend, args.method, template, k[0], k[1], expl[k],
                                expl[base[k]], head_name(*base[k]), groups[k], args.k)
            for k in heads
        ))  # fmt: skip
        wall = time.perf_counter() - t0
        await backend.aclose()
        return rows, wall

    rows, wall = asyncio.run(all_heads())
    return {
        "k": args.k, "before": args.before, "wall_s": wall, "heads": len(heads),
        "requests": backend.stats.requests, "failures": backend.stats.failures,
        "prompt_tokens": backend.stats.prompt_tokens,
        "rows": [{"head": head_name(r["layer"], r["head"]), "score": r["score"],
                  "baseline": r["baseline_score"], "n_failed": r["n_failed"],
                  "sim_acts": r["sim_acts"]} for r in rows],
    }  # fmt: skip


def child_stages(args: argparse.Namespace) -> dict:
    import shutil

    from head_explain import artifacts as art
    from head_explain import config, explain, pipeline
    from head_explain.llm.embedded import EmbeddedBackend, engine

    out = Path(args.work) / f"k{args.k}{'-noprefix' if args.before else ''}"
    out.mkdir(parents=True)
    for name in ("events.parquet", "evidence.parquet"):
        shutil.copy2(Path(args.prepared) / name, out / name)
    cfg = config.load_params(REPO / "params.yaml", {
        "llm_cache": "off", "excerpts_per_request": args.k, "outdir": str(out)})  # fmt: skip
    if args.before:

        async def no_prefix(self, text: str) -> None:
            return None

        EmbeddedBackend.share_prefix = no_prefix  # type: ignore[method-assign]
        explain.COMPLETION_STOP = ""  # generate all explain_max_tokens
    engine()  # the model loads before the clock starts
    walls = {}
    for stage in ("explain", "simulate"):
        t0 = time.perf_counter()
        pipeline.RUNNERS[stage].run(cfg)
        walls[stage] = time.perf_counter() - t0
    expl = [r["explanation"] for r in art.read_jsonl(out / "explanations.jsonl")]
    import pandas as pd

    scores = pd.read_parquet(out / "scores.parquet").sort_values(["layer", "head"])
    return {"k": args.k, "before": args.before, "walls": walls, "explanations": expl,
            "scores": scores["score"].round(6).tolist(),
            "auc": scores["pair_auc_easy"].round(6).tolist()}  # fmt: skip


def report_stages(runs: list[dict]) -> None:
    import numpy as np

    ref = runs[0]
    total0 = sum(ref["walls"].values())
    print(f"{'per request':<14} {'explain s':>9} {'simulate s':>10} {'total s':>8} "
          f"{'speed-up':>8} same explanations | max |d score| | max |d auc_easy|")  # fmt: skip
    for run in runs:
        total = sum(run["walls"].values())
        label = f"{run['k']}" + (" (before)" if run["before"] else "")
        ds = np.nanmax(np.abs(np.array(ref["scores"], float) - np.array(run["scores"], float)))
        da = np.nanmax(np.abs(np.array(ref["auc"], float) - np.array(run["auc"], float)))
        print(f"{label:<14} {run['walls']['explain']:>9.1f} {run['walls']['simulate']:>10.1f} "
              f"{total:>8.1f} {total0 / total:>7.2f}x {str(run['explanations'] == ref['explanations']):>17} "
              f"| {ds:>13.2e} | {da:>16.2e}")  # fmt: skip


def spawn(args: argparse.Namespace, k: int, before: bool, base_url: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--k", str(k), "--prepared", args.prepared,
           "--llm", args.llm, "--method", args.method, "--heads", str(args.heads),
           "--concurrency", str(args.concurrency), "--base-url", base_url, "--work", args.work]  # fmt: skip
    if args.stages:
        cmd.append("--stages")
    if before:
        cmd.append("--before")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child failed (k={k}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(ref: dict, run: dict) -> dict:
    import numpy as np

    from head_explain.simulate import correlation

    a = {r["head"]: r for r in ref["rows"]}
    both = [(a[r["head"]], r) for r in run["rows"] if r["head"] in a]
    s0 = np.array([x["score"] for x, _ in both], float)
    s1 = np.array([y["score"] for _, y in both], float)
    ok = np.isfinite(s0) & np.isfinite(s1)
    v0, v1 = [], []
    for x, y in both:
        for p, q in zip(x["sim_acts"], y["sim_acts"], strict=True):
            if p is not None and q is not None:
                v0 += p
                v1 += q
    v0a, v1a = np.array(v0, float), np.array(v1, float)
    return {
        "r_scores": correlation(s0[ok], s1[ok]),
        "mean_abs_delta": float(np.abs(s0[ok] - s1[ok]).mean()) if ok.any() else float("nan"),
        "r_values": correlation(v0a, v1a),
        "max_value_diff": float(np.abs(v0a - v1a).max()) if len(v0a) else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", default=str(REPO / "outputs"))
    ap.add_argument("--per-request", default="1,3,6")
    ap.add_argument("--llm", default="embedded", choices=["embedded", "server"])
    ap.add_argument("--method", default="echo", choices=["echo", "chat"])
    ap.add_argument("--heads", type=int, default=18)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--before", action="store_true")
    ap.add_argument("--stages", action="store_true", help="whole explain + simulate stages")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_stages(args) if args.stages else child(args)))
        return 0

    import numpy as np

    args.work = tempfile.mkdtemp(prefix="bench_batching_")
    server = None
    base_url = ""
    if args.llm == "server":
        from llama_server import LlamaServer

        server = LlamaServer(Path(args.work) / "server.log")
        server.start()
        base_url = server.base_url
    try:
        settings = [(int(k), False) for k in args.per_request.split(",")]
        if args.before:
            settings.append((1, True))
        runs = [spawn(args, k, np_, base_url) for k, np_ in settings]
    finally:
        if server is not None:
            server.stop()
    if args.stages:
        report_stages(runs)
        return 0
    ref = runs[0]
    print(f"{args.llm} {args.method}, {ref['heads']} heads, concurrency {args.concurrency}, "
          f"from {args.prepared}")  # fmt: skip
    print(f"{'per request':<14} {'requests':>8} {'prompt tok':>10} {'wall s':>7} {'speed-up':>8} "
          f"{'score':>7} {'baseline':>8} {'failed':>6} | vs first: {'r heads':>7} "
          f"{'|d score|':>9} {'r values':>8} {'max |d v|':>9}")  # fmt: skip
    for run in runs:
        scores = [(r["score"], r["baseline"]) for r in run["rows"]]
        paired = [(s, b) for s, b in scores if np.isfinite(s) and np.isfinite(b)]
        c = compare(ref, run)
        label = f"{run['k']}" + (" (before)" if run["before"] else "")
        print(f"{label:<14} {run['requests']:>8} {run['prompt_tokens']:>10} {run['wall_s']:>7.1f} "
              f"{ref['wall_s'] / run['wall_s']:>7.2f}x "
              f"{np.mean([s for s, _ in paired]):>7.3f} {np.mean([b for _, b in paired]):>8.3f} "
              f"{sum(r['n_failed'] for r in run['rows']):>6} | {c['r_scores']:>7.3f} "
              f"{c['mean_abs_delta']:>9.3f} {c['r_values']:>8.3f} {c['max_value_diff']:>9.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
