"""Kill-and-resume of the explain stage: nothing paid for is lost, nothing is paid twice.

The stage runs as a subprocess (the DVC entry point) on prepared artifacts, through the
fault proxy to a real llama.cpp server, and is SIGKILLed with two heads written and the
third request in flight. The rerun must send exactly the requests the killed run did not
finish, end with the explanations of an uninterrupted run, and a further rerun must
send none. benchmarks/bench_resume.py runs the same scenario and prints the counts.
"""

from __future__ import annotations

import pytest
from fault_proxy import FaultProxy, kill_and_resume

pytestmark = [pytest.mark.slow, pytest.mark.llama_server]


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
