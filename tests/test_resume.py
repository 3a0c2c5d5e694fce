"""Kill-and-resume of the LLM stages: nothing paid for is lost, nothing is paid twice.

The stages run as subprocesses (the DVC entry point) on prepared artifacts, through the
fault proxy to a real llama.cpp server, and are SIGKILLed with a request in flight.
explain: two heads written and the third request held. simulate: two calls answered
and cached and the third held. The rerun must send exactly the requests the killed run
did not finish, end with the outputs of an uninterrupted run, and a further rerun must
send none. benchmarks/bench_resume.py runs the same scenarios and prints the counts.

A rerun on unchanged inputs also sends nothing when some replies were unusable: the
cache remembers a reply that stayed unusable after every retry (llm/cache.py).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from fault_proxy import (
    ExplainRun,
    FaultProxy,
    kill_and_resume,
    kill_and_resume_simulate,
    score_differences,
)
from llama_server import SERVER_MODEL, copy_artifacts

from head_explain import artifacts as art
from head_explain import config, explain, pipeline, prompts

pytestmark = pytest.mark.slow


@pytest.mark.llama_server
def test_kill_and_resume_pays_only_for_unfinished_calls(
    chat_llama_server, prepared_artifacts, tmp_path
):
    with FaultProxy(chat_llama_server) as proxy:
        r = kill_and_resume(prepared_artifacts, tmp_path, proxy, kill_after=2)

    clean = r["clean"]
    n = clean["llm"]["requests"]
    assert n == clean["heads"] == 4 and clean["failed"] == 0 and r["clean_posts"] == n
    assert all(r["clean_explanations"].values())

    # the kill: two heads written (and cached), the third request in flight, no final file
    assert r["partial_at_kill"] == 2 and r["cached_at_kill"] == 2
    assert not r["final_after_kill"]
    assert r["killed_posts"] == 3 and r["dropped"] == 1  # the in-flight one died with it

    # the resumed run pays for exactly the calls the killed run did not finish
    resumed = r["resumed"]
    assert resumed["llm"]["requests"] == n - r["cached_at_kill"] == r["resumed_posts"]
    assert resumed["resumed"] == r["partial_at_kill"]  # read back from the partial file
    assert resumed["llm"]["cache_hits"] == r["cached_at_kill"] - r["partial_at_kill"]
    assert (resumed["heads"], resumed["failed"]) == (4, 0)
    assert r["resumed_explanations"] == r["clean_explanations"]
    assert not r["partial_after_resume"]

    # a full rerun: everything from the cache
    rerun = r["rerun"]
    assert rerun["llm"]["requests"] == 0 and r["rerun_posts"] == 0
    assert rerun["llm"]["cache_hits"] == n
    assert r["rerun_explanations"] == r["clean_explanations"]


# --- simulate ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explained(chat_llama_server, prepared_artifacts, tmp_path_factory):
    """Simulate-stage inputs kept small (a llama.cpp simulation call takes seconds on 2
    cores): the prepared events of two heads with their top scoring excerpt only, and
    their explanations from a real explain stage. 2 heads x 1 excerpt x (own + baseline
    explanation) = 4 simulation calls, plus one pair-judging call per explanation for
    each excerpt that marks a pair (its positive)."""
    out = tmp_path_factory.mktemp("explained")
    events, meta = art.read_parquet(prepared_artifacts / "events.parquet", {"model": SERVER_MODEL})
    heads = sorted(events.groupby(["layer", "head"]).groups)[:2]
    keep = pd.Series(list(zip(events["layer"], events["head"], strict=True))).isin(heads)
    events = events[keep.to_numpy() & (events["split"] != "score_random").to_numpy()]
    art.write_parquet(out / "events.parquet", events.reset_index(drop=True), meta)
    stage = ExplainRun(out, chat_llama_server, out / "explain.sqlite")
    res = stage.run()
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(stage.rows()) == 2 and all(stage.explanations().values()), stage.rows()
    return out


@pytest.mark.llama_server
def test_simulate_kill_and_resume_pays_only_for_unfinished_calls(llama_server, explained, tmp_path):
    with FaultProxy(llama_server) as proxy:
        r = kill_and_resume_simulate(explained, tmp_path, proxy, kill_after=2, method="chat")

    clean = r["clean"]
    n = clean["llm"]["requests"]
    events = pd.read_parquet(explained / "events.parquet")
    top = events[events["split"] == "score_top"]
    distinct = 2 * (len(top) + int((top["pair_label"].map(len) > 0).sum()))
    assert len(top) == 2 and clean["heads"] == 2 and n == distinct == r["clean_cache_rows"]
    assert r["clean_posts"] == n + r["probe_posts"] and clean["llm"]["retries"] == 0

    # the kill: two calls answered and cached, the third in flight, no scores written
    assert r["cached_at_kill"] == 2 and not r["final_after_kill"]
    assert r["killed_posts"] == r["probe_posts"] + 3 and r["dropped"] == 1

    # the resumed run pays for exactly the calls the killed run did not finish
    resumed = r["resumed"]
    assert resumed["llm"]["requests"] == n - r["cached_at_kill"]
    assert r["resumed_posts"] == resumed["llm"]["requests"] + r["probe_posts"]
    assert resumed["llm"]["cache_hits"] == r["cached_at_kill"]
    assert resumed["llm"]["failures"] == clean["llm"]["failures"]
    assert score_differences(r["clean_scores"], r["resumed_scores"]) == []
    assert list(r["resumed_scores"]["n_failed"]) == list(r["clean_scores"]["n_failed"])

    # a full rerun: everything from the cache (unusable replies included), nothing sent
    rerun = r["rerun"]
    assert rerun["llm"]["requests"] == 0 and r["rerun_posts"] == 0
    assert rerun["llm"]["cache_hits"] == n
    assert rerun["llm"]["failures"] == clean["llm"]["failures"]
    assert score_differences(r["clean_scores"], r["rerun_scores"]) == []


# --- a rerun with unusable replies --------------------------------------------------------
def test_rerun_with_unusable_replies_makes_no_requests(prepared_artifacts, tmp_path, monkeypatch):
    """explain + simulate with the embedded LLM, one explanation and every simulation
    with one head's explanation made unusable (as a model might answer); then both stages
    again on unchanged inputs: zero requests, the same failures, the same outputs."""
    from head_explain.llm import embedded
    from head_explain.llm.base import ScoreResult

    out = copy_artifacts(prepared_artifacts, tmp_path / "out")
    stage = ExplainRun(
        out,
        "",
        tmp_path / "cache.sqlite",
        llm="embedded",
        llm_concurrency=4,
        max_failed_fraction=1.0,
        explain_prompt="explain_v1",  # v1's prefill path, whose empty reply is unusable
    )  # fmt: skip (only its params file is used)
    cfg = config.load_params(stage.params)
    events, _ = art.read_parquet(out / "events.parquet", {"model": SERVER_MODEL})
    groups = dict(iter(events.groupby(["layer", "head"], sort=True)))
    spoilt_head = sorted(groups)[0]
    spoilt = explain.build_messages(prompts.load(explain.PROMPT), groups[spoilt_head])[-1]
    spoil_explanation: list[str] = []  # the explanation whose simulations come back unreadable
    calls = {"chat": 0, "score": 0}
    real_chat, real_score = embedded.EmbeddedBackend._chat, embedded.EmbeddedBackend._score

    async def chat(self, messages, *args):
        calls["chat"] += 1
        res = await real_chat(self, messages, *args)
        if spoilt in messages:
            res.text = ""  # no sentence after the prefill: an unusable explanation
        return res

    async def score(self, prompt, slot_offsets, candidates):
        calls["score"] += 1
        res = await real_score(self, prompt, slot_offsets, candidates)
        if spoil_explanation and spoil_explanation[0] in prompt:
            return ScoreResult([None] * len(res.slots), res.prompt_tokens, res.latency_s, 0.0,
                               cached=False)  # fmt: skip
        return res

    monkeypatch.setattr(embedded.EmbeddedBackend, "_chat", chat)
    monkeypatch.setattr(embedded.EmbeddedBackend, "_score", score)

    first_explain = pipeline.RUNNERS["explain"].run(cfg)
    rows = {(r["layer"], r["head"]): r for r in art.read_jsonl(out / "explanations.jsonl")}
    assert "unusable reply after 2 tries" in rows[spoilt_head]["error"]  # one varied retry
    good = [k for k in sorted(rows) if rows[k]["explanation"]]
    assert good, rows
    spoil_explanation.append(rows[good[0]]["explanation"])
    first_simulate = pipeline.RUNNERS["simulate"].run(cfg)
    scores = pd.read_parquet(out / "scores.parquet")
    assert first_explain["llm"]["requests"] == 4 and first_explain["llm"]["failures"] >= 1
    assert first_simulate["llm"]["failures"] >= 2  # its own excerpts, and as a baseline
    # an unusable reply is asked once more (varied), never more
    assert calls["chat"] == 4 + first_explain["llm"]["unusable_retries"] == 5
    assert calls["score"] == first_simulate["llm"]["requests"] + first_simulate["llm"]["retries"]
    made = dict(calls)
    failures = first_explain["llm"]["failures"] + first_simulate["llm"]["failures"]
    assert 2 <= stage.cache_rows(unusable=True) <= failures  # remembered, marked unusable

    # unchanged inputs: both stages again, fresh backends on the same cache
    again_explain = pipeline.RUNNERS["explain"].run(cfg)
    again_simulate = pipeline.RUNNERS["simulate"].run(cfg)
    assert calls == made  # the model was never asked
    assert again_explain["llm"]["requests"] == 0 and again_simulate["llm"]["requests"] == 0
    assert again_explain["llm"]["failures"] == first_explain["llm"]["failures"]
    assert again_explain["llm"]["cache_hits"] == first_explain["llm"]["failures"]
    assert again_simulate["llm"]["failures"] == first_simulate["llm"]["failures"]
    assert again_simulate["llm"]["cache_hits"] == first_simulate["llm"]["requests"]
    again_rows = {(r["layer"], r["head"]): r for r in art.read_jsonl(out / "explanations.jsonl")}
    assert {k: r["explanation"] for k, r in again_rows.items()} == {
        k: r["explanation"] for k, r in rows.items()
    }
    assert "unusable reply (cached): empty or unusable" in again_rows[spoilt_head]["error"]
    assert score_differences(scores, pd.read_parquet(out / "scores.parquet")) == []

    # as after `dvc repro -f` with no partial file: every head is looked up, none is asked
    (out / ".explanations.jsonl.partial").unlink()
    third = pipeline.RUNNERS["explain"].run(cfg)
    assert third["llm"]["requests"] == 0 and third["llm"]["cache_hits"] == 4
    assert calls == made
    third_rows = {(r["layer"], r["head"]): r for r in art.read_jsonl(out / "explanations.jsonl")}
    assert "unusable reply (cached)" in third_rows[spoilt_head]["error"]
    assert {k: r["explanation"] for k, r in third_rows.items()} == {
        k: r["explanation"] for k, r in rows.items()
    }
    assert (
        json.loads((out / "metrics" / "explain.json").read_text())["failed"]
        == (first_explain["failed"])
    )
