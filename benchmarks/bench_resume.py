"""Benchmark kill-and-resume of the explain and simulate stages: requests paid with and
without a kill.

    .venv/bin/python benchmarks/bench_resume.py [--kill-after 2] [--prepared DIR]
        [--sim-kill-after 4] [--sim-method chat|echo] [--no-simulate]

Starts its own llama.cpp server (bundled SmolLM2, tests/llama_server.py) behind the
fault proxy (tests/fault_proxy.py), prepares tiny artifacts (4 heads; 30-60 s on 2
cores, or reuse --prepared DIR holding events.parquet), then runs the scenario of
tests/test_resume.py: a clean explain run; a run SIGKILLed after `--kill-after` heads
with the next request in flight; its resume; and a full rerun. Then the same for the
simulate stage on the clean run's explanations (all 4 heads, 16 calls), against a
second server started with --logits_all (simulation needs log-probs), killed after
`--sim-kill-after` cached calls. Prints the requests each sent. The ideal ratio
(killed + resumed) / clean is (N + in-flight) / N: the calls finished before the kill
are never paid again; only the one cut off is. `--sim-method echo` is the faithful
method but about 5x slower on llama-cpp-python (top log-probs of every prompt token).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fault_proxy import (  # noqa: E402
    FaultProxy,
    kill_and_resume,
    kill_and_resume_simulate,
    score_differences,
)
from llama_server import LlamaServer, ServerUnavailable, prepare_artifacts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kill-after", type=int, default=2, help="heads written before the kill")
    p.add_argument("--prepared", help="outdir of an earlier `--until select` run to reuse")
    p.add_argument("--sim-kill-after", type=int, default=4,
                   help="simulation calls cached before the kill")  # fmt: skip
    p.add_argument("--sim-method", choices=["chat", "echo"], default="chat")
    p.add_argument("--no-simulate", action="store_true", help="the explain stage only")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_resume_") as tmp:
        work = Path(tmp)
        try:
            server = LlamaServer(work / "server.log", logits_all=False)
        except ServerUnavailable as exc:
            print(f"cannot run: {exc}", file=sys.stderr)
            return 2
        t0 = time.monotonic()
        server.start()
        try:
            if args.prepared:
                prepared = Path(args.prepared)
                print(f"artifacts: reusing {prepared}")
            else:
                prepared = prepare_artifacts(work / "prepared")
                print(f"artifacts: prepared in {time.monotonic() - t0:.1f}s")
            with FaultProxy(server.base_url) as proxy:
                r = kill_and_resume(prepared, work, proxy, kill_after=args.kill_after)
        finally:
            server.stop()
        sim = None
        if not args.no_simulate:
            sim_server = LlamaServer(work / "sim_server.log", logits_all=True)
            sim_server.start()
            try:
                with FaultProxy(sim_server.base_url) as proxy:
                    sim = kill_and_resume_simulate(
                        work / "clean", work, proxy, kill_after=args.sim_kill_after,
                        method=args.sim_method,
                    )  # fmt: skip
            finally:
                sim_server.stop()

    clean = r["clean"]["llm"]["requests"]
    resumed = r["resumed"]["llm"]["requests"]
    killed_plus_resumed = r["killed_posts"] + resumed
    same = r["resumed_explanations"] == r["clean_explanations"]
    print(f"heads: {r['clean']['heads']}, killed after {r['partial_at_kill']} "
          f"(cached at kill: {r['cached_at_kill']}, in flight: {r['dropped']})")  # fmt: skip
    print(f"clean run:   {clean} requests in {r['clean_s']:.1f}s")
    print(f"killed run:  {r['killed_posts']} requests sent before SIGKILL at {r['killed_s']:.1f}s")
    print(f"resumed run: {resumed} requests, {r['resumed']['llm']['cache_hits']} cache hits, "
          f"{r['resumed']['resumed']} heads from the partial file, {r['resumed_s']:.1f}s")  # fmt: skip
    print(f"full rerun:  {r['rerun']['llm']['requests']} requests, "
          f"{r['rerun']['llm']['cache_hits']} cache hits, {r['rerun_s']:.1f}s")  # fmt: skip
    print(f"explanations identical to the clean run: {same}")
    print(f"requests sent (clean run): {clean}")
    print(f"requests sent (killed + resumed): {killed_plus_resumed}")
    print(f"ratio (killed + resumed) / clean: {killed_plus_resumed / clean:.2f}")
    ok = same and resumed == clean - r["cached_at_kill"]
    if sim is not None:
        ok = report_simulate(sim, args.sim_method) and ok
    return 0 if ok else 1


def report_simulate(s: dict, method: str) -> bool:
    """Print the simulate scenario's numbers (requests exclude the echo probe; POSTs
    include it); True if the resume paid only for unfinished calls and scored the same."""
    probe = s["probe_posts"]
    clean = s["clean"]["llm"]["requests"]
    resumed = s["resumed"]["llm"]["requests"]
    killed = s["killed_posts"] - probe - s["dropped"]  # answered before the kill
    killed_plus_resumed = killed + s["dropped"] + resumed
    diffs = score_differences(s["clean_scores"], s["resumed_scores"])
    rerun_diffs = score_differences(s["clean_scores"], s["rerun_scores"])
    print(f"\nsimulate ({method}): {s['clean']['heads']} heads, {clean} calls; killed after "
          f"{s['cached_at_kill']} cached calls (in flight: {s['dropped']})")  # fmt: skip
    print(f"clean run:   {clean} requests ({s['clean']['llm']['failures']} failed) in "
          f"{s['clean_s']:.1f}s")  # fmt: skip
    print(f"killed run:  {killed + s['dropped']} requests sent before SIGKILL at "
          f"{s['killed_s']:.1f}s")  # fmt: skip
    print(f"resumed run: {resumed} requests, {s['resumed']['llm']['cache_hits']} cache hits, "
          f"{s['resumed_s']:.1f}s")  # fmt: skip
    print(f"full rerun:  {s['rerun']['llm']['requests']} requests ({s['rerun_posts']} POSTs), "
          f"{s['rerun']['llm']['cache_hits']} cache hits, {s['rerun_s']:.1f}s")  # fmt: skip
    print(f"scores identical to the clean run (1e-9): resumed {not diffs}, rerun {not rerun_diffs}")
    print(f"requests sent (clean run): {clean}")
    print(f"requests sent (killed + resumed): {killed_plus_resumed}")
    print(f"ratio (killed + resumed) / clean: {killed_plus_resumed / clean:.2f}")
    return (
        not diffs and not rerun_diffs and resumed == clean - s["cached_at_kill"]
        and s["rerun"]["llm"]["requests"] == 0 and s["rerun_posts"] == 0
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
