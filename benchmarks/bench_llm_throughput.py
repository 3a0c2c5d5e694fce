"""Benchmark: explain + simulate at server capacity, behind a remote-like latency.

    .venv/bin/python benchmarks/bench_llm_throughput.py [--latency 2.0]
        [--concurrency 8] [--prepared DIR] [--max-heads 8] [--method chat|echo]
        [--per-request 1]

Starts the real llama.cpp server (bundled SmolLM2, tests/llama_server.py) behind the
loopback fault proxy (tests/fault_proxy.py) that adds a fixed `--latency` to every
request (a remote API's round trip), then runs the explain and simulate stages through
the openai backend with `llm_concurrency=--concurrency`, LLM cache off (every call is a
request). Prints each stage's wall time against its ideal,
requests x latency / concurrency (rounded up to whole waves), and the ratio
ideal / wall for both stages together (target >= 0.8). The stages run one after the
other (simulate needs the explanations), so each is compared with its own ideal.

llama-cpp-python's server has no parallel slots (`--n_parallel` is llama.cpp's own
server); it computes one request at a time. The latency is therefore chosen well above
one request's compute time times the concurrency (a request's round trip minus the latency
is printed: the server's queue and compute), so what is measured is whether the client
keeps `concurrency` requests in flight, not the 2-core server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HEAD_EXPLAIN_PROGRESS", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fault_proxy import FaultProxy  # noqa: E402
from llama_server import PREP_ARGS, LlamaServer, ServerUnavailable, prepare_artifacts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency", type=float, default=2.0, help="seconds added per request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prepared", help="a folder with events.parquet (else made: 30-60 s)")
    ap.add_argument("--max-heads", type=int, default=8, help="heads when preparing")
    ap.add_argument("--method", default="chat", choices=["chat", "echo"])
    ap.add_argument("--per-request", type=int, default=1, help="excerpts_per_request")
    args = ap.parse_args()

    from head_explain import config, pipeline

    work = Path(tempfile.mkdtemp(prefix="bench_llm_"))
    if args.prepared:
        prepared = Path(args.prepared)
    else:
        PREP_ARGS[PREP_ARGS.index("--max-heads") + 1] = str(args.max_heads)
        t0 = time.time()
        prepared = prepare_artifacts(work / "prepared")
        print(f"prepared {args.max_heads} heads in {time.time() - t0:.0f}s")
    try:
        server = LlamaServer(work / "server.log")
    except ServerUnavailable as exc:
        print(f"skipped: {exc}")
        return 0
    server.start()
    try:
        with FaultProxy(server.base_url, latency_s=args.latency) as proxy:
            out = work / "out"
            out.mkdir()
            shutil.copy2(prepared / "events.parquet", out / "events.parquet")
            cfg = config.build(dict(
                model="smollm2-135m-instruct", llm="openai", openai_model="smollm2",
                openai_base_url=proxy.url, simulation_method=args.method, llm_cache="off",
                explain_max_tokens=24, llm_concurrency=args.concurrency, outdir=str(out),
                max_failed_fraction=1.0, excerpts_per_request=args.per_request,
            ))  # fmt: skip
            rows = []
            for stage in ("explain", "simulate"):
                proxy.reset_records()
                t0 = time.perf_counter()
                m = pipeline.RUNNERS[stage].run(cfg)
                wall = time.perf_counter() - t0
                n = len(proxy.posts())
                ideal = math.ceil(n / args.concurrency) * args.latency
                calls = [
                    json.loads(x)
                    for x in (out / f"llm_calls/{stage}.jsonl").read_text().splitlines()
                ]
                trip = sum(c["latency_s"] or 0 for c in calls) / max(len(calls), 1)
                rows.append((stage, n, wall, ideal, m["failed"], m["llm"], trip))
    finally:
        server.stop()
    print(f"latency {args.latency}s, concurrency {args.concurrency}, method {args.method}, "
          f"{args.per_request} excerpt(s) per request")  # fmt: skip
    print(f"{'stage':<9} {'requests':>8} {'wall s':>8} {'ideal s':>8} {'ideal/wall':>10} failed"
          "  mean round trip s (latency + server queue + compute)")  # fmt: skip
    for stage, n, wall, ideal, failed, _, trip in rows:
        print(f"{stage:<9} {n:>8} {wall:>8.2f} {ideal:>8.2f} {ideal / wall:>10.2f} {failed:>6}"
              f"  {trip:.2f}")  # fmt: skip
    wall = sum(r[2] for r in rows)
    ideal = sum(r[3] for r in rows)
    flat = sum(r[1] for r in rows) * args.latency / args.concurrency
    print(f"{'total':<9} {sum(r[1] for r in rows):>8} {wall:>8.2f} {ideal:>8.2f} "
          f"{ideal / wall:>10.2f}   (requests x latency / concurrency = {flat:.2f} s: "
          f"{flat / wall:.2f})")  # fmt: skip
    print(json.dumps({r[0]: r[5] for r in rows}))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
