"""Faults between us and a real llama.cpp server, injected by tests/fault_proxy.py.

Every fault class is met twice: once transient (the call survives with bounded, jittered
retries, the answer equals a fault-free one, and only it is cached) and once persistent
(exactly max_retries + 1 requests, then one LLMError; a head that meets it is a recorded
failure, never a crash or a zero score). An unusable reply is the exception: it is
retried once, with a varied request (temperature and seed), never at full price again. A persistent transport fault leaves nothing in
the cache (a rerun asks again); persistently unusable content is remembered as one row
marked unusable, so the same call again fails at once and sends nothing. Then whole explain stages:
too many failed heads (exit 1, valid and resumable artifacts) and the server killed
mid-stage (recorded failures; once it is back a rerun pays only for what was missing).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time

import numpy as np
import pytest
from fault_proxy import (
    CUT_JSON,
    NOT_JSON,
    PASS,
    RESET,
    TRUNCATE,
    ExplainRun,
    FaultProxy,
    chat_content,
    echo_tops,
    hang,
    mutate,
    slow,
    status,
    wait_until,
)
from llama_server import SERVER_MODEL, copy_artifacts

from head_explain import artifacts as art
from head_explain import explain, prompts, simulate, simulation_replies
from head_explain.errors import LLMError
from head_explain.llm.cache import LLMCache
from head_explain.llm.openai_backend import OpenAIBackend

pytestmark = [pytest.mark.slow, pytest.mark.llama_server]

MSG = [{"role": "user", "content": "Name a colour. One word."}]
ERROR_LINE = "head-explain explain: error: "  # how stage_main reports a HeadExplainError
KEY = "sk-faulttest-0123456789abcdefSECRETSECRET9876543210"


@pytest.fixture(scope="module")
def proxy(chat_llama_server):
    with FaultProxy(chat_llama_server) as p:
        yield p


@pytest.fixture()
def fp(proxy):
    """The module's proxy with an empty plan and no records; left that way after."""
    proxy.plan()
    proxy.reset_records()
    yield proxy
    proxy.plan()
    proxy.release()


def make_backend(proxy, tmp_path, retries=2, timeout=30.0, name="cache.sqlite"):
    b = OpenAIBackend(
        SERVER_MODEL, base_url=proxy.url, timeout_s=timeout, max_retries=retries,
        cache=LLMCache(tmp_path / name),
    )  # fmt: skip
    b.delays = []

    async def sleep(s: float) -> None:  # real waits, recorded
        b.delays.append(s)
        await asyncio.sleep(s)

    b.sleep = sleep
    return b


def run(coro):
    return asyncio.run(coro)


def cache_values(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [v for (v,) in conn.execute("SELECT value FROM responses")]


def cache_verdicts(path) -> list[str | None]:
    """Per row: NULL for a usable reply, else why it was remembered as unusable."""
    with sqlite3.connect(path) as conn:
        return [u for (u,) in conn.execute("SELECT unusable FROM responses")]


def assert_remembered(b, fp, path, call, reason: str) -> None:
    """After a persistent unusable-content failure: one row marked unusable, and the
    same call again raises at once (a cache hit and a failure) with no request."""
    assert cache_verdicts(path) == [reason]
    before = b.stats.as_dict()
    fp.reset_records()
    with pytest.raises(LLMError, match=r"unusable reply \(cached\): ") as info:
        run(call())
    assert reason in str(info.value) and "\n" not in str(info.value)
    assert fp.posts() == []  # nothing sent
    after = b.stats.as_dict()
    assert after["requests"] == before["requests"] and after["retries"] == before["retries"]
    assert after["cache_hits"] == before["cache_hits"] + 1
    assert after["failures"] == before["failures"] + 1


def nonempty(res) -> None:
    if not res.text.strip():
        raise ValueError("empty reply")


@pytest.fixture(scope="module")
def reference(proxy, tmp_path_factory) -> str:
    """The fault-free answer to MSG (temperature 0: every retry must reproduce it)."""
    proxy.plan()
    b = make_backend(proxy, tmp_path_factory.mktemp("ref"))
    text = run(b.chat(MSG, max_tokens=4)).text
    run(b.aclose())
    assert text.strip()
    return text


# --- transient faults: survived ----------------------------------------------------------
TRANSIENT = [
    status(429, retry_after="1"), status(429), status(500), status(502), status(503),
    RESET, hang(30), TRUNCATE, CUT_JSON, NOT_JSON, mutate(chat_content(""), "empty content"),
]  # fmt: skip


@pytest.mark.parametrize("fault", TRANSIENT, ids=str)
def test_transient_fault_is_retried(fp, tmp_path, reference, fault):
    b = make_backend(fp, tmp_path, retries=2, timeout=5.0)
    fp.plan(fault)
    t0 = time.monotonic()
    res = run(b.chat(MSG, max_tokens=4, validate=nonempty))
    took = time.monotonic() - t0
    assert not res.cached and res.text.strip()
    assert (b.stats.requests, b.stats.retries, b.stats.failures) == (1, 1, 0)
    posts = fp.posts("/chat/completions")
    assert [r.fault for r in posts] == [str(fault), "pass"]
    if fault.kind == "mutate":  # an unusable reply: asked again varied, not the same again
        assert posts[1].json()["temperature"] == 0.7 and posts[1].json()["seed"] == 1
        assert b.stats.unusable_retries == 1
    else:  # a transport fault: the same request again, the same answer
        assert res.text == reference and posts[1].json() == posts[0].json()
    (delay,) = b.delays
    if fault.label == "status 429 retry-after 1":
        assert 1.0 <= delay <= 1.1 and took >= 1.0  # Retry-After honoured (+ <=10% jitter)
    else:
        assert 0.25 <= delay <= 0.5  # full jitter on the first backoff step of 0.5 s
    if fault.kind == "hang":
        assert took >= 5.0  # waited out the client timeout, no longer than needed
        assert posts[0].outcome == "hung"
    # only the usable reply was stored: the same call again is a free cache hit
    assert len(cache_values(tmp_path / "cache.sqlite")) == 1
    again = run(b.chat(MSG, max_tokens=4, validate=nonempty))
    assert again.cached and again.text == res.text and len(fp.posts()) == 2
    run(b.aclose())


def test_a_timeout_stretches_the_next_wait_and_lowers_concurrency(fp, tmp_path, reference):
    """A server slower than llm_timeout_s (it answers after 3.5 s, the timeout is 3 s):
    with the same timeout every retry would time out too, behind the request the client
    gave up on. The retries wait 6 s and get their answers. Two requests that timed out
    together double the timeout once, and halve the concurrency once."""
    b = make_backend(fp, tmp_path, retries=2, timeout=3.0)
    fp.plan(then=slow(3.5))
    other = [{"role": "user", "content": "Say hello."}]

    async def both():
        return await asyncio.gather(
            b.chat(MSG, max_tokens=4, validate=nonempty),
            b.chat(other, max_tokens=4, validate=nonempty),
        )

    first, second = run(both())
    assert first.text == reference and second.text.strip()
    assert (b.stats.timeouts, b.stats.retries, b.stats.failures) == (2, 2, 0)
    assert b.timeout_s == 3.0 and b.timeout_now == 6.0  # stretched once, not twice
    (limit,) = b._limits.values()
    assert limit.lowest == 2  # llm_concurrency 4, halved once
    posts = fp.posts("/chat/completions")
    assert len(posts) == 4 and all(p.outcome == "answered" for p in posts)  # the server
    run(b.aclose())  # answered all four, the two abandoned ones too (as llama.cpp does)


# --- persistent faults: bounded, then one error ------------------------------------------
PERSISTENT = [
    status(429, retry_after="1"), status(429), status(500), status(502), status(503),
    RESET, hang(30), TRUNCATE, CUT_JSON, NOT_JSON, mutate(chat_content(""), "empty content"),
]  # fmt: skip


@pytest.mark.parametrize("fault", PERSISTENT, ids=str)
def test_persistent_fault_gives_up_after_budget(fp, tmp_path, fault):
    b = make_backend(fp, tmp_path, retries=2, timeout=1.5 if fault.kind == "hang" else 10.0)
    fp.plan(then=fault)
    with pytest.raises(LLMError) as info:
        run(b.chat(MSG, max_tokens=4, validate=nonempty))
    msg = str(info.value)
    assert "\n" not in msg and len(msg) <= 500
    if fault.kind == "mutate":  # unusable content: one varied retry, not max_retries
        assert "unusable reply after 2 tries: empty reply" in msg
        assert len(fp.posts("/chat/completions")) == 2
        assert (b.stats.requests, b.stats.retries, b.stats.failures) == (1, 1, 1)
        assert len(b.delays) == 1 and 0.25 <= b.delays[0] <= 0.5
    else:
        assert "after 2 retries" in msg
        assert len(fp.posts("/chat/completions")) == 3  # max_retries + 1, never more
        assert (b.stats.requests, b.stats.retries, b.stats.failures) == (1, 2, 1)
        assert len(b.delays) == 2
    if fault.kind == "mutate":
        pass
    elif fault.label == "status 429 retry-after 1":
        assert all(1.0 <= d <= 1.1 for d in b.delays)
    else:  # exponential, jittered: [0.25, 0.5] then [0.5, 1.0]
        assert 0.25 <= b.delays[0] <= 0.5 and 0.5 <= b.delays[1] <= 1.0
    if fault.kind == "mutate":  # the last reply is remembered, marked unusable
        assert_remembered(b, fp, tmp_path / "cache.sqlite",
                          lambda: b.chat(MSG, max_tokens=4, validate=nonempty), "empty reply")  # fmt: skip
    else:
        assert cache_values(tmp_path / "cache.sqlite") == []  # a transport error: nothing
    run(b.aclose())


def test_transport_failure_is_not_remembered(fp, tmp_path, reference):
    """A call that gave up on 503s is asked again by the next call (and then cached)."""
    b = make_backend(fp, tmp_path, retries=1)
    fp.plan(status(503), status(503))
    with pytest.raises(LLMError, match="failed after 1 retries"):
        run(b.chat(MSG, max_tokens=4, validate=nonempty))
    assert cache_values(tmp_path / "cache.sqlite") == []
    res = run(b.chat(MSG, max_tokens=4, validate=nonempty))
    assert res.text == reference and not res.cached and len(fp.posts()) == 3
    assert cache_verdicts(tmp_path / "cache.sqlite") == [None]
    run(b.aclose())


def test_verdict_is_read_only_by_fresh_calls_and_replaced_by_a_usable_reply(
    fp, tmp_path, reference
):
    """Two calls with one key, one request at a time: A's retries run out (its last
    reply is remembered as unusable) while B is between its own tries. B's retry is not
    cut short by A's verdict, and B's usable reply replaces it for every later call."""
    path = tmp_path / "cache.sqlite"
    b = make_backend(fp, tmp_path, retries=1)
    b._concurrency = 1

    async def tick(s: float) -> None:  # equal waits: the calls alternate, A first
        b.delays.append(s)
        await asyncio.sleep(0.01)

    b.sleep = tick
    empty = mutate(chat_content(""), "empty")
    fp.plan(empty, empty, empty)  # A, B, A; then B passes

    async def both():
        return await asyncio.gather(
            b.chat(MSG, max_tokens=4, validate=nonempty),
            b.chat(MSG, max_tokens=4, validate=nonempty),
            return_exceptions=True,
        )

    a, bb = run(both())
    assert isinstance(a, LLMError) and "unusable reply after 2 tries: empty reply" in str(a)
    assert not isinstance(bb, Exception) and bb.text.strip() and not bb.cached  # varied retry
    assert [r.fault for r in fp.posts()] == ["empty", "empty", "empty", "pass"]
    assert cache_verdicts(path) == [None]  # B's answer replaced A's verdict
    c = run(b.chat(MSG, max_tokens=4, validate=nonempty))
    assert c.cached and c.text == bb.text and len(fp.posts()) == 4
    assert (b.stats.requests, b.stats.failures, b.stats.cache_hits) == (2, 1, 1)
    run(b.aclose())


def test_old_cache_file_gains_the_unusable_column(fp, tmp_path, reference):
    """A cache written before verdicts existed keeps working: its rows stay usable hits,
    and a verdict can be stored in it."""
    path = tmp_path / "cache.sqlite"
    b = make_backend(fp, tmp_path)
    run(b.chat(MSG, max_tokens=4, validate=nonempty))
    run(b.aclose())
    with sqlite3.connect(path) as conn:  # back to the old layout, row kept
        conn.execute("CREATE TABLE old AS SELECT key, value, created FROM responses")
        conn.execute("DROP TABLE responses")
        conn.execute("ALTER TABLE old RENAME TO responses")
    fp.reset_records()
    b = make_backend(fp, tmp_path)
    hit = run(b.chat(MSG, max_tokens=4, validate=nonempty))
    assert hit.cached and hit.text == reference and fp.posts() == []
    fp.plan(then=mutate(chat_content(""), "empty"))
    with pytest.raises(LLMError, match="unusable reply after 2 tries"):
        run(b.chat(MSG, max_tokens=5, validate=nonempty))
    assert sorted(cache_verdicts(path), key=lambda v: v or "") == [None, "empty reply"]
    run(b.aclose())


def test_mixed_faults_share_one_budget(fp, tmp_path, reference):
    b = make_backend(fp, tmp_path, retries=2)
    fp.plan(status(503), mutate(chat_content(" "), "blank"))  # then: pass
    assert run(b.chat(MSG, max_tokens=4, validate=nonempty)).text.strip()
    assert b.stats.retries == 2 and len(fp.posts()) == 3
    fp.reset_records()
    fp.plan(status(503), mutate(chat_content(""), "empty"), then=RESET)
    with pytest.raises(LLMError, match="failed after 2 retries: APIConnectionError"):
        run(b.chat(MSG, max_tokens=5, validate=nonempty))
    assert len(fp.posts()) == 3  # 503, empty, reset: one budget of 2 retries, not 3 x 3
    run(b.aclose())


def test_unusable_cached_reply_is_asked_again(fp, tmp_path, reference):
    """A reply cached before a validator existed (or by another caller) that the
    validator rejects is re-requested, and the good answer replaces it."""
    b = make_backend(fp, tmp_path)
    fp.plan(mutate(chat_content(""), "empty"))
    assert run(b.chat(MSG, max_tokens=4)).text == ""  # no validator: cached as is
    res = run(b.chat(MSG, max_tokens=4, validate=nonempty))
    assert res.text == reference and not res.cached and b.stats.cache_hits == 0
    assert run(b.chat(MSG, max_tokens=4, validate=nonempty)).cached
    assert len(cache_values(tmp_path / "cache.sqlite")) == 1
    run(b.aclose())


def test_key_never_leaks_under_faults(fp, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    b = make_backend(fp, tmp_path, retries=1)
    echoed = f"Incorrect API key provided: {KEY[:12]}****{KEY[-4:]} (full: {KEY})"
    fp.plan(then=status(503, message=echoed))
    with pytest.raises(LLMError) as info:
        run(b.chat(MSG, max_tokens=4))
    fp.plan(mutate(chat_content(KEY), "key in reply"))

    def reject(res) -> None:  # the reason quotes the reply, key and all
        raise ValueError(f"rejected {res.text!r}")

    with pytest.raises(LLMError) as info2:
        run(b.chat(MSG, max_tokens=4, validate=reject))
    fp.plan(then=mutate(chat_content(f"my key is {KEY}"), "key in every reply"))
    with pytest.raises(LLMError) as info3:  # the remembered (last) reply quotes the key
        run(b.chat(MSG, max_tokens=6, validate=reject))
    with pytest.raises(LLMError, match=r"unusable reply \(cached\)") as info4:
        run(b.chat(MSG, max_tokens=6, validate=reject))
    assert any("***" in (v or "") for v in cache_verdicts(tmp_path / "cache.sqlite"))
    text = str(info.value) + str(info2.value) + str(info3.value) + str(info4.value)
    text += caplog.text
    assert "503" in str(info.value) and "unusable reply" in str(info2.value)
    assert KEY not in text and KEY[:12] not in text and KEY[-12:] not in text
    for value in cache_values(tmp_path / "cache.sqlite"):
        assert KEY not in value
    for verdict in cache_verdicts(tmp_path / "cache.sqlite"):  # reasons quote replies
        assert verdict is None or (KEY not in verdict and KEY[:12] not in verdict)
    run(b.aclose())


def test_echo_probe_retries_transient_fault(logprob_fp, tmp_path):
    """The one-off echo probe (run_simulate's method=auto) survives a 503 as well."""
    fp = logprob_fp
    b = make_backend(fp, tmp_path, retries=1)
    fp.plan(status(503))
    assert b.supports_echo() is True and b.stats.retries == 1
    assert [r.fault for r in fp.posts("/completions")] == ["status 503", "pass"]
    b2 = make_backend(fp, tmp_path, retries=1, name="other.sqlite")
    fp.plan(then=RESET)
    with pytest.raises(LLMError, match="echo probe.*failed after 1 retries"):
        b2.supports_echo()
    assert b2._echo is None  # a transient failure is not remembered as "no echo"
    run(b.aclose())
    run(b2.aclose())


# --- simulation replies: shape, range, count, unreadable slots ---------------------------
@pytest.fixture()
def logprob_fp(llama_server):
    """A proxy in front of the --logits_all server (chat top_logprobs need it)."""
    with FaultProxy(llama_server) as p:
        yield p


@pytest.mark.parametrize(
    "bad", ["", "The head is active on b.", '{"1": 0, "2": 11, "3": 2}', '{"1": 0, "2": 9}',
            "[0, 11, -2]", "[0, 9]"],
)  # fmt: skip
def test_chat_values_rejects_unusable_replies(bad):
    with pytest.raises(ValueError):
        simulation_replies.parse_chat_values(bad, 3)


def test_simulate_chat_constrained_by_schema(logprob_fp, tmp_path):
    """The real llama.cpp server gets the JSON schema (one required integer per token)
    and answers with exactly the numbered values: no miscount to retry."""
    fp = logprob_fp
    b = make_backend(fp, tmp_path, retries=2)
    tpl = prompts.load(simulate.CHAT_PROMPT)
    tokens = ["a", " (", " b", ")", " c", " d", " e"]
    vals = run(simulate.simulate_excerpt(b, "chat", tpl, "attends to parentheses.", tokens))
    assert len(vals) == 7 and ((vals >= 0) & (vals <= 10)).all()
    posts = fp.posts("/chat/completions")  # the first form sent is taken: no refusals
    assert len(posts) == 1 + b.stats.retries, [p.fault for p in posts]
    sent = posts[-1].json()["response_format"]
    assert sent["type"] == "json_object" and sent["schema"]["required"] == [
        str(i) for i in range(1, 8)
    ]
    assert b.stats.failures == 0
    run(b.aclose())


def test_simulate_batches_excerpts_and_counts_a_failed_batch(logprob_fp, tmp_path):
    """excerpts_per_request 2 over 3 excerpts: 2 requests to the real server, values split
    back per excerpt; a batch whose replies stay unusable fails each of its excerpts."""
    fp = logprob_fp
    b = make_backend(fp, tmp_path, retries=2)
    tpl = prompts.load(simulate.CHAT_PROMPT)
    seqs = [["a", " (", " b", ")"], [" c", " d"], [" e", " (", " f"]]
    excerpts = [simulate.Excerpt("score_top", t, np.zeros(len(t))) for t in seqs]
    preds, errs = run(simulate.simulate_set(b, "chat", tpl, "attends to (.", excerpts, 2))
    assert errs == [] and [len(p) for p in preds] == [4, 2, 3]
    required = sorted(len(p.json()["response_format"]["schema"]["required"]) for p in fp.posts())
    assert required == [3, 6]  # one request of 4 + 2 tokens, one of 3
    fp.reset_records()
    fp.plan(then=mutate(chat_content("[0, 9]"), "wrong count"))
    preds, errs = run(simulate.simulate_set(b, "chat", tpl, "attends to ).", excerpts, 2))
    assert preds == [None, None, None] and len(errs) == 3
    assert all("unusable reply" in e for e in errs)
    run(b.aclose())


def test_simulate_chat_rejects_unusable_values(logprob_fp, tmp_path):
    fp = logprob_fp
    b = make_backend(fp, tmp_path, retries=4)
    tpl = prompts.load(simulate.CHAT_PROMPT)
    tokens = ["a", " (", " b"]
    retries0 = b.stats.retries
    fp.plan(
        mutate(chat_content('{"1": 0, "2": 11, "3": 2}'), "out of range"),
        then=mutate(chat_content('{"1": 0, "2": 2, "3": 9}'), "good"),
    )
    vals = run(simulate.simulate_excerpt(b, "chat", tpl, "attends to parentheses.", tokens))
    assert list(vals) == [0, 2, 9]
    assert b.stats.retries - retries0 == 1 and len(fp.posts()) == 2 and b.stats.failures == 0
    assert fp.posts()[1].json()["temperature"] == 0.7  # the one retry is varied
    texts = [json.loads(v)["text"] for v in cache_values(tmp_path / "cache.sqlite")]
    assert texts == ['{"1": 0, "2": 2, "3": 9}']  # the unusable reply was not kept
    run(b.aclose())


def test_simulate_chat_validator_persistent(fp, tmp_path):
    """The same validator on a short prompt: a persistent wrong count is one LLMError
    after one varied retry (2 requests, however large max_retries is)."""
    b = make_backend(fp, tmp_path, retries=4)
    fp.plan(then=mutate(chat_content("[0, 9]"), "wrong count"))
    with pytest.raises(LLMError, match="unusable reply after 2 tries: reply has 2 values for 3"):
        run(b.chat(MSG, max_tokens=4, validate=lambda r: simulate.chat_values(r, 3)))
    assert len(fp.posts()) == 2
    (value,) = cache_values(tmp_path / "cache.sqlite")  # the last reply, marked unusable
    assert json.loads(value)["text"] == "[0, 9]"
    assert_remembered(
        b, fp, tmp_path / "cache.sqlite",
        lambda: b.chat(MSG, max_tokens=4, validate=lambda r: simulate.chat_values(r, 3)),
        "reply has 2 values for 3 tokens",
    )  # fmt: skip
    run(b.aclose())


def test_echo_rejects_unreadable_and_out_of_range_slots(logprob_fp, tmp_path):
    fp = logprob_fp
    b = make_backend(fp, tmp_path, retries=2)
    assert b.supports_echo()  # the probe passes before any fault is planned
    prompt = "1 2 3 4 5 6 7"
    slots = [i + 1 for i, c in enumerate(prompt) if c == " "]
    digits = [str(i) for i in range(10)]

    def check(r):
        return simulate.check_echo_slots(r, len(slots))

    fp.reset_records()
    fp.plan(mutate(echo_tops({"zz": -0.1}), "no digits"))
    res = run(b.score_prompt(prompt, slots, digits, validate=check))
    assert any(res.slots) and b.stats.retries == 1 and len(fp.posts("/completions")) == 2
    assert max(res.slots[-1], key=res.slots[-1].get) == "7"
    fp.reset_records()
    fp.plan(then=mutate(echo_tops({"5": 2.0}), "lp>0"))
    with pytest.raises(LLMError, match="after 2 tries: slot log-probability 2.0 is out of range"):
        run(b.score_prompt(prompt, slots, digits[::-1], validate=check))  # a new key
    assert len(fp.posts("/completions")) == 2
    fp.reset_records()
    b.max_retries = 1
    fp.plan(then=mutate(echo_tops({"zz": -0.1}), "no digits"))
    with pytest.raises(LLMError, match="unusable reply after 2 tries: none of the 6 value slots"):
        run(b.score_prompt(prompt, slots[:-1] + [len(prompt)], digits, validate=check))
    run(b.aclose())


# --- one head: a recorded failure, never a crash or a zero ------------------------------
@pytest.fixture(scope="module")
def head_events(prepared_artifacts):
    events, _ = art.read_parquet(prepared_artifacts / "events.parquet", {"model": SERVER_MODEL})
    (layer, head), grp = next(iter(events.groupby(["layer", "head"], sort=True)))
    return int(layer), int(head), grp


@pytest.mark.parametrize(
    "fault",
    [status(503), RESET, mutate(chat_content("See ![x](http://x.png)"), "unusable")],
    ids=str,
)
def test_explain_head_records_persistent_failure(fp, tmp_path, head_events, fault):
    b = make_backend(fp, tmp_path, retries=1)
    layer, head, grp = head_events
    fp.plan(then=fault)
    row = run(explain.explain_head(b, prompts.load(explain.PROMPT), layer, head, grp, 40))
    assert row["explanation"] == "" and row["raw"] is None
    assert row["error"].startswith("LLMError: ") and len(fp.posts()) == 2
    if fault.kind != "mutate":
        assert cache_values(tmp_path / "cache.sqlite") == []  # a rerun asks again
    else:
        assert "unusable reply after 2 tries: empty or unusable explanation" in row["error"]
        (verdict,) = cache_verdicts(tmp_path / "cache.sqlite")
        assert verdict.startswith("empty or unusable explanation")
        fp.reset_records()  # the head again: the same recorded failure, nothing sent
        again = run(explain.explain_head(b, prompts.load(explain.PROMPT), layer, head, grp, 40))
        assert again["explanation"] == "" and fp.posts() == []
        assert again["error"].startswith("LLMError: ")
        assert "unusable reply (cached): empty or unusable explanation" in again["error"]
        assert (b.stats.cache_hits, b.stats.failures, b.stats.requests) == (1, 2, 1)
    run(b.aclose())


def test_explain_head_survives_unusable_then_good(fp, tmp_path, head_events):
    b = make_backend(fp, tmp_path, retries=1)
    layer, head, grp = head_events
    fp.plan(mutate(chat_content(""), "empty"))
    row = run(explain.explain_head(b, prompts.load(explain.PROMPT), layer, head, grp, 40))
    assert row["error"] is None and row["explanation"].startswith("attends")
    assert b.stats.retries == 1 and len(fp.posts()) == 2
    run(b.aclose())


def test_score_head_failure_is_nan_not_zero(fp, tmp_path, head_events):
    b = make_backend(fp, tmp_path, retries=1)
    layer, head, grp = head_events
    fp.plan(then=status(503))
    tpl = prompts.load(simulate.CHAT_PROMPT)
    row = run(simulate.score_head(b, "chat", tpl, layer, head, "attends from x to y.",
                                  "attends from a to b.", "L0H1", grp))  # fmt: skip
    assert math.isnan(row["score"]) and math.isnan(row["baseline_score"])
    assert row["error"].startswith("2/2 excerpts failed") and "503" in row["error"]
    assert row["n_failed"] == 2 and len(fp.posts()) == 8  # 4 calls x (1 + 1 retry)
    run(b.aclose())


# --- whole stages ---------------------------------------------------------------------------
def test_stage_exits_1_over_max_failed_fraction_and_reruns_from_cache(
    fp, tmp_path, prepared_artifacts
):
    stage = ExplainRun(copy_artifacts(prepared_artifacts, tmp_path / "out"), fp.url,
                       tmp_path / "cache.sqlite", llm_max_retries=1)  # fmt: skip
    fp.plan(PASS, then=status(503))  # one head answered, then the endpoint keeps failing
    res = stage.run()
    assert res.returncode == 1, res.stderr[-2000:]
    line = [ln for ln in res.stderr.splitlines() if ln.startswith(ERROR_LINE)][-1]
    assert "explain: 3/4 heads failed (max_failed_fraction=0.5)" in line
    assert "first error: LLMError" in line and "503" in line and "rerun to retry" in line
    rows = stage.rows()  # the artifacts are valid: every head, failed ones marked
    assert len(rows) == 4 and sum(bool(r["explanation"]) for r in rows) == 1
    assert all(bool(r["error"]) != bool(r["explanation"]) for r in rows)
    m = stage.metrics()
    assert (m["heads"], m["failed"]) == (4, 3)
    assert m["llm"]["requests"] == 4 and m["llm"]["retries"] == 3 and m["llm"]["failures"] == 3
    assert len(fp.posts("/chat/completions")) == 1 + 3 * 2
    # finished heads stay in the partial file while any head failed (resumable even
    # with llm_cache=off)
    assert stage.cache_rows() == 1 and len(stage.partial_rows()) == 4

    # Below the threshold: exit 0, a failure recorded. Only the 3 failed heads are paid.
    # Two 503s: one head gets both (it fails) or two heads one each (both retry and pass;
    # a slot is not held during a backoff, so which it is depends on timing).
    fp.reset_records()
    fp.plan(status(503), status(503))
    res = stage.run()
    assert res.returncode == 0, res.stderr[-2000:]
    m = stage.metrics()
    # the finished head comes back from the partial file: no request, no cache lookup
    assert (m["llm"]["requests"], m["resumed"]) == (3, 1)
    assert (m["failed"], m["llm"]["retries"]) in ((1, 1), (0, 2)), m
    assert len(fp.posts("/chat/completions")) == 3 + m["llm"]["retries"]

    fp.reset_records()  # and once the endpoint is healthy, only what is left
    left = m["failed"]
    res = stage.run()
    assert res.returncode == 0 and stage.metrics()["failed"] == 0
    assert stage.metrics()["llm"]["requests"] == left and len(fp.posts()) == left
    assert all(r["explanation"] and not r["error"] for r in stage.rows())


def test_server_killed_mid_stage_then_rerun_from_cache(
    killable_llama_server, tmp_path, prepared_artifacts
):
    """The real server process is SIGKILLed while the stage runs (no proxy involved)."""
    server = killable_llama_server
    stage = ExplainRun(copy_artifacts(prepared_artifacts, tmp_path / "out"), server.base_url,
                       tmp_path / "cache.sqlite", llm_max_retries=2)  # fmt: skip
    stage.start()
    wait_until(lambda: len(stage.partial_rows()) >= 1, 180, "the first finished head")
    server.kill()
    done = stage.cache_rows()
    _, err = stage.proc.communicate(timeout=120)
    assert stage.proc.returncode == 1, err[-2000:]
    failed = 4 - done
    assert failed >= 2, "the kill came too late to test anything"
    line = [ln for ln in err.splitlines() if ln.startswith(ERROR_LINE)][-1]
    assert f"explain: {failed}/4 heads failed" in line and "Connection" in line
    m = stage.metrics()
    assert m["failed"] == failed and m["llm"]["failures"] == failed
    assert m["llm"]["retries"] == 2 * failed  # each failed head used its whole budget
    assert sum(bool(r["explanation"]) for r in stage.rows()) == done

    server.start()  # back, same port (the cache key holds the URL)
    res = stage.run()
    assert res.returncode == 0, res.stderr[-2000:]
    m = stage.metrics()
    assert m["failed"] == 0 and m["llm"]["requests"] == failed
    assert m["resumed"] == done  # finished calls were not repeated (partial file)
