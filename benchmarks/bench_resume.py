"""Benchmark kill-and-resume of the explain stage: requests paid with and without a kill.

    .venv/bin/python benchmarks/bench_resume.py [--kill-after 2] [--prepared DIR]

Starts its own llama.cpp server (bundled SmolLM2, tests/llama_server.py) behind the
fault proxy (tests/fault_proxy.py), prepares tiny artifacts (4 heads; 30-60 s on 2
cores, or reuse --prepared DIR holding events.parquet), then runs the scenario of
tests/test_resume.py: a clean explain run; a run SIGKILLed after `--kill-after` heads
with the next request in flight; its resume; and a full rerun. Prints the requests
each sent. The ideal ratio (killed + resumed) / clean is (N + in-flight) / N: the
calls finished before the kill are never paid again; only the one cut off is.
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

from fault_proxy import FaultProxy, kill_and_resume  # noqa: E402
from llama_server import LlamaServer, ServerUnavailable, prepare_artifacts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kill-after", type=int, default=2, help="heads written before the kill")
    p.add_argument("--prepared", help="outdir of an earlier `--until select` run to reuse")
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
    return 0 if same and resumed == clean - r["cached_at_kill"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
