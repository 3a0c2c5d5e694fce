"""explain + simulate through the `openai` backend against the real llama.cpp server.

Both simulation methods run end to end on real artifacts: `echo` (prompt log-probs from
/v1/completions) and `chat` (values in the reply, expected values from top log-probs).
"""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from head_explain import config, pipeline

pytestmark = [pytest.mark.slow, pytest.mark.llama_server]


@pytest.fixture
def outdir(tiny_artifacts, tmp_path):
    out = tmp_path / "outputs"
    shutil.copytree(tiny_artifacts, out)
    return out


def _cfg(outdir, url, tmp_path, method):
    return config.build(
        dict(
            model="smollm2-135m-instruct", heads="L17H5,L8H7", topk=8, candidates=16,
            llm="openai", openai_model="smollm2", openai_base_url=url,
            simulation_method=method, llm_cache=str(tmp_path / "cache.sqlite"),
            explain_max_tokens=24, llm_concurrency=2, outdir=str(outdir),
            max_failed_fraction=0.5,
            # llama-cpp-python builds echo log-probs in Python (it sorts the whole
            # vocabulary at every prompt token): 20-60 s a simulation prompt on 2 slow
            # cores. At the default 60 s the first two requests time out (the backend
            # then doubles the timeout: 554 s and passed; before it did, 24 timeouts,
            # 1130 s and both variants failed); 600 s spares those two lost tries.
            llm_timeout_s=600.0,
        )
    )  # fmt: skip


@pytest.mark.parametrize("method", ["echo", "chat"])
def test_explain_and_simulate_through_openai_backend(
    outdir, llama_server, tmp_path, monkeypatch, method
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = _cfg(outdir, llama_server, tmp_path, method)
    pipeline.preflight(cfg, ["explain", "simulate"])
    m = pipeline.RUNNERS["explain"].run(cfg)
    assert m["backend"] == "openai" and m["heads"] == 2
    rows = [json.loads(line) for line in (outdir / "explanations.jsonl").read_text().splitlines()]
    assert {(r["layer"], r["head"]) for r in rows} == {(17, 5), (8, 7)}
    for r in rows:
        assert r["explainer_model"] == "smollm2" and r["prompt_tokens"] > 100
        assert r["explanation"] or r["error"]
    unexplained = {f"L{r['layer']}H{r['head']}": r["error"] for r in rows if not r["explanation"]}
    assert not unexplained, f"not explained: {unexplained}"
    calls = [json.loads(x) for x in (outdir / "llm_calls" / "explain.jsonl").open()]
    assert {c["head"] for c in calls} == {"L17H5", "L8H7"} and all(c["op"] == "chat" for c in calls)
    s = pipeline.RUNNERS["simulate"].run(cfg)
    assert s["method"] == method
    scores = pd.read_parquet(outdir / "scores.parquet")
    assert len(scores) == 2 and set(scores["method"]) == {method}
    for r in scores.itertuples():
        # a finite score or a recorded reason: never a silent zero
        assert math.isfinite(r.score) or r.error, r
        assert r.baseline_from in ("L17H5", "L8H7") and r.baseline_from != f"L{r.layer}H{r.head}"
    # the path must work: every head scored (a few unreadable echo slots are allowed and
    # recorded in `error`; a chat reply is schema-constrained, so no miscount); failures
    # are named
    failed = {f"L{r.layer}H{r.head}": r.error for r in scores.itertuples()
              if not math.isfinite(r.score) or (method == "chat" and r.n_failed)}  # fmt: skip
    assert not failed, f"not scored: {failed}"
    calls = [json.loads(x) for x in (outdir / "llm_calls" / "simulate.jsonl").open()]
    assert {c["op"] for c in calls} == {"score" if method == "echo" else "chat"}
    # a refused response_format or an unusable reply retried once is a recorded call
    # error; most calls must still succeed
    errors = [c["error"] for c in calls if c["error"]]
    assert len(errors) < len(calls) / 2, errors
    # pair judging answers on both paths (chat: the reply schema {"1": v, ...} that
    # llama.cpp enforces; before it, every chat pair reply was free text and failed)
    assert not scores["pair_error"].fillna("").str.contains("requests failed").any(), scores
    assert scores["n_pairs_pos"].sum() > 0
    # --plan after the run: every request of both stages is a cache hit, nothing to pay
    from head_explain.plan import plan

    p = {st["stage"]: st for st in plan(cfg)["stages"]}
    assert p["explain"]["requests"] == 2 == p["explain"]["cached"], p
    # one request per scoring excerpt and one per excerpt that marks pairs, each for the
    # head's own and its partner's explanation: the plan counts exactly the stage's calls
    events = pd.read_parquet(outdir / "events.parquet")
    sc = events[events["split"].isin(["score_top", "score_random"])]
    expected = 2 * (len(sc) + int((sc["pair_label"].map(len) > 0).sum()))
    assert p["simulate"]["requests"] == p["simulate"]["cached"] == expected, p
    assert expected <= s["llm"]["requests"]
    assert p["simulate"]["prompt_tokens"] == 0 and not p["simulate"]["estimated"]
    again = pipeline.RUNNERS["simulate"].run(cfg)  # every usable answer comes from the cache
    assert again["llm"]["cache_hits"] > 0
    if method == "echo":
        assert again["llm"]["requests"] == 0
    else:  # unusable replies are remembered too: the rerun asks nothing
        assert again["llm"]["requests"] == 0 and again["llm"]["failures"] == s["llm"]["failures"]
