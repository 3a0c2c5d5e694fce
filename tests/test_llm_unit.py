"""LLM layer logic with fake HTTP transports: retries, parsing, cache, pricing, redaction.

Fakes live only here; the embedded and llama.cpp tests use real models and servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx2
import pytest

from head_explain.errors import ConfigError, LLMError
from head_explain.llm import pricing
from head_explain.llm.base import label_calls
from head_explain.llm.cache import LLMCache, cache_key, open_cache, resolve_path
from head_explain.llm.openai_backend import (
    OpenAIBackend,
    backoff_s,
    chat_logprobs,
    echo_alignment,
    read_slots,
    redact,
    redact_url,
)

KEY = "sk-test-0123456789abcdefSECRETSECRET9876543210"
JSON = {"content-type": "application/json"}


def chat_body(text: str = "hello", pt: int = 7, ct: int = 2) -> dict:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": text},
                "logprobs": {
                    "content": [
                        {
                            "token": "hel",
                            "logprob": -0.1,
                            "top_logprobs": [
                                {"token": "hel", "logprob": -0.1},
                                {"token": "hi", "logprob": -2.5},
                            ],
                        }
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
    }


class Script:
    """A fake server: answers requests from a list of (status, headers, body)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls.append(request)
        status, headers, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(body, Exception):  # a transport fault, e.g. httpx2.ReadTimeout
            raise body
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        return httpx2.Response(status, headers=headers, content=body)


def backend(script: Script, *, url="http://fake.local/v1", retries=3, cache=None, model="m"):
    b = OpenAIBackend(
        model,
        base_url=url,
        max_retries=retries,
        cache=cache,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(script)),
        sync_http_client=httpx2.Client(transport=httpx2.MockTransport(script)),
    )
    b.delays = []

    async def fake_sleep(s: float) -> None:
        b.delays.append(s)

    b.sleep = fake_sleep
    return b


MSG = [{"role": "user", "content": "hi"}]


def chat(b, **kw):
    return asyncio.run(b.chat(MSG, max_tokens=5, **kw))


# --- retries ------------------------------------------------------------------------------
def test_retry_after_is_honoured(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Script(
        (429, {**JSON, "retry-after": "2"}, {"error": {"message": "slow down"}}),
        (503, {**JSON, "retry-after-ms": "1500"}, {"error": {"message": "busy"}}),
        (200, JSON, chat_body()),
    )
    b = backend(s)
    res = chat(b, top_logprobs=2)
    assert res.text == "hello" and not res.cached
    assert len(s.calls) == 3
    assert 2.0 <= b.delays[0] <= 2.2 and 1.5 <= b.delays[1] <= 1.65
    assert b.stats.retries == 2 and b.stats.requests == 1 and b.stats.failures == 0
    assert res.logprobs[0].token == "hel" and res.logprobs[0].top["hi"] == -2.5
    assert KEY not in json.dumps(res.raw)


def test_gives_up_after_max_retries_and_counts():
    s = Script((500, JSON, {"error": {"message": "boom"}}))
    b = backend(s, retries=3)
    with pytest.raises(LLMError, match=r"after 3 retries.*500"):
        chat(b)
    assert len(s.calls) == 4
    assert (b.stats.requests, b.stats.retries, b.stats.failures) == (1, 3, 1)
    # exponential growth (with jitter in [0.5, 1] of the nominal delay)
    assert b.delays[0] < b.delays[2] and b.delays[2] >= 0.5 * 4 * 0.5


@pytest.mark.parametrize(
    "bad",
    [
        (200, JSON, b'{"id": "c1", "object": "chat.completion", "choi'),  # truncated
        (200, {"content-type": "text/html"}, b"<html>proxy error</html>"),  # not JSON
        (200, JSON, {"unexpected": True}),  # JSON without choices
        (502, {"content-type": "text/html"}, b"<html>bad gateway</html>"),
    ],
)
def test_malformed_bodies_are_retried(bad):
    s = Script(bad, (200, JSON, chat_body("ok")))
    b = backend(s)
    assert chat(b).text == "ok"
    assert b.stats.retries == 1 and len(s.calls) == 2


def test_client_errors_are_not_retried():
    s = Script((400, JSON, {"error": {"message": "bad max_tokens"}}))
    b = backend(s)
    with pytest.raises(LLMError, match="bad max_tokens"):
        chat(b)
    assert len(s.calls) == 1 and b.stats.retries == 0 and b.stats.failures == 1


def test_connection_errors_are_retried():
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            raise httpx2.ConnectError("refused", request=request)
        return httpx2.Response(200, headers=JSON, content=json.dumps(chat_body()).encode())

    b = backend(Script((200, JSON, chat_body())))
    b._http_client = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    assert chat(b).text == "hello" and b.stats.retries == 1


def test_backoff_bounds():
    import random

    rng = random.Random(0)
    for attempt in range(1, 8):
        d = backoff_s(attempt, None, rng)
        nominal = min(30.0, 0.5 * 2 ** (attempt - 1))
        assert 0.5 * nominal <= d <= nominal
    assert backoff_s(1, 3600, rng) <= 120 * 1.1  # a huge Retry-After is capped


def test_non_transient_error_is_one_line_and_not_retried():
    s = Script((404, JSON, {"error": {"message": "no such model"}}))
    b = backend(s, retries=5)
    with pytest.raises(LLMError, match=r"chat \(model 'm' at http://fake.local/v1\) failed: "):
        chat(b)
    assert len(s.calls) == 1 and b.stats.retries == 0


def _bad_then(*texts):
    return Script(*[(200, JSON, chat_body(t)) for t in texts])


def _no_bad(res):
    if res.text.startswith("bad"):
        raise ValueError(f"unusable {res.text!r}")


def test_unusable_reply_is_retried_once_with_a_varied_request(tmp_path):
    s = _bad_then("bad one", "good")
    b = backend(s, retries=3, cache=LLMCache(tmp_path / "c.sqlite"))
    res = chat(b, validate=_no_bad)
    assert res.text == "good" and len(s.calls) == 2
    first, second = (json.loads(c.content) for c in s.calls)
    assert first["temperature"] == 0 and "seed" not in first
    assert second["temperature"] == 0.7 and second["seed"] == 1  # varied, not the same again
    assert (b.stats.retries, b.stats.unusable_retries, b.stats.failures) == (1, 1, 0)
    assert chat(b, validate=_no_bad).cached  # cached under the original request's key
    # still unusable after its one retry: 2 requests, not max_retries + 1 = 4
    s2 = _bad_then("bad", "bad again")
    b2 = backend(s2, retries=3)
    with pytest.raises(LLMError, match="unusable reply after 2 tries: unusable 'bad again'"):
        chat(b2, validate=_no_bad)
    assert len(s2.calls) == 2 and b2.stats.unusable_retries == 1


def test_json_schema_is_sent_and_falls_back_where_rejected(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    schema = {"type": "object", "properties": {"1": {"type": "integer"}}, "required": ["1"]}
    rejected = (422, JSON, {"detail": [{"loc": ["body", "response_format", "type"]}]})
    s = Script(rejected, (200, JSON, chat_body('{"1": 3}')))
    b = backend(s)
    assert chat(b, json_schema=schema).text == '{"1": 3}'
    sent = [json.loads(c.content).get("response_format") for c in s.calls]
    assert sent[0] == {"type": "json_object", "schema": schema}  # llama.cpp's form first
    assert sent[1]["type"] == "json_schema" and sent[1]["json_schema"]["schema"] == schema
    assert b.stats.retries == 0  # a rejected form is not a retry
    s.answers = [(200, JSON, chat_body('{"1": 4}'))]
    chat(b, json_schema=schema, top_logprobs=1)
    assert json.loads(s.calls[-1].content)["response_format"]["type"] == "json_schema"
    # an endpoint that takes neither form gets free text (the validator still checks)
    s3 = Script(rejected, rejected, (200, JSON, chat_body("[3]")))
    b3 = backend(s3)
    assert chat(b3, json_schema=schema).text == "[3]"
    assert "response_format" not in json.loads(s3.calls[-1].content)
    # OpenAI's API: Structured Outputs only
    s4 = Script((200, JSON, chat_body('{"1": 1}')))
    chat(backend(s4, url="https://api.openai.com/v1"), json_schema=schema)
    fmt = json.loads(s4.calls[0].content)["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True


def test_adaptive_limit_halves_on_429_and_regrows():
    from head_explain.llm.policy import AdaptiveLimit

    async def scenario():
        lim = AdaptiveLimit(8)
        peak = {"now": 0, "max": 0}

        async def one():
            async with lim:
                peak["now"] += 1
                peak["max"] = max(peak["max"], peak["now"])
                await asyncio.sleep(0.001)
                peak["now"] -= 1
                lim.succeeded()

        await asyncio.gather(*(one() for _ in range(40)))
        assert peak["max"] == 8
        lim.throttled()
        lim.throttled()  # the same overload answering many requests: one cut
        assert int(lim.limit) == 4 and lim.lowest == 4
        peak["max"] = 0
        await asyncio.gather(*(one() for _ in range(4)))
        assert peak["max"] <= 4
        for _ in range(200):
            async with lim:
                lim.succeeded()
        assert lim.limit == 8  # regrown to the configured concurrency

    asyncio.run(scenario())


def test_max_cost_stops_before_the_request_that_would_exceed_it(monkeypatch, tmp_path):
    from head_explain.llm.base import CostLimitReached

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Script((200, JSON, chat_body(pt=1000, ct=100)))
    b = backend(s, url="https://api.openai.com/v1", model="gpt-4o-mini",
                cache=LLMCache(tmp_path / "c.sqlite"))  # fmt: skip
    # one reply costs (1000 * 0.15 + 100 * 0.6) / 1e6 = $0.00021; the next request's
    # estimate (4 prompt + 5 max_tokens tokens) would not fit under $0.000212
    b.max_cost_usd = 0.000212
    chat(b)
    with pytest.raises(CostLimitReached, match="max_cost_usd=0.000212 reached"):
        asyncio.run(b.chat([{"role": "user", "content": "other"}], max_tokens=5))
    assert len(s.calls) == 1 and b.cost_limited  # refused unsent
    assert chat(b).cached  # what was paid for stays usable


def test_a_timeout_doubles_the_next_wait_up_to_8x():
    """Each request that times out doubles what the next one waits, up to 8 x
    llm_timeout_s, and halves the concurrency; the timeouts are counted."""
    timeout = (0, {}, httpx2.ReadTimeout("the server is still busy"))
    s = Script(*[timeout] * 5, (200, JSON, chat_body()))
    b = backend(s, retries=5)
    b._concurrency = 8
    b.timeout_s = b.timeout_now = 10.0
    assert chat(b).text == "hello"
    assert [r.extensions["timeout"]["read"] for r in s.calls] == [10, 20, 40, 80, 80, 80]
    assert (b.stats.timeouts, b.stats.retries, b.stats.failures) == (5, 5, 0)
    (limit,) = b._limits.values()
    assert limit.lowest == 4  # halved once: a cut per cool-down, and these came within 1 s


def test_429_lowers_concurrency_and_is_counted(monkeypatch):
    s = Script((429, JSON, {"error": {"message": "slow"}}), (200, JSON, chat_body()))
    b = backend(s, retries=2)
    b._concurrency = 8
    chat(b)
    assert b.stats.throttled == 1 and b.stats.retries == 1


# --- the key ----------------------------------------------------------------------------
def test_key_never_in_errors_or_logs(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    echoed = f"Incorrect API key provided: {KEY[:12]}****{KEY[-4:]} (full: {KEY})"
    s = Script(
        (429, JSON, {"error": {"message": echoed}}),
        (401, JSON, {"error": {"message": echoed}}),
    )
    b = backend(s, url="https://api.openai.com/v1")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LLMError) as info:
        chat(b)
    text = str(info.value) + caplog.text
    assert "401" in str(info.value)
    assert KEY not in text and KEY[:12] not in text and KEY[-12:] not in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "sk-" not in redact(f"token sk-{'x' * 30}")


def test_url_credentials_never_printed(monkeypatch, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    secret, token = "sk-userinfo0123456789abcdef", "qs0123456789SECRET"
    url = f"http://alice:{secret}@fake.local/v1?api_key={token}&x=1"
    s = Script((503, JSON, {"error": {"message": f"echo {url}"}}))
    b = backend(s, url=url, retries=1)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LLMError) as info:
        chat(b)
    text = str(info.value) + caplog.text + json.dumps(b.calls)
    assert "fake.local/v1" in str(info.value)
    for bad in (secret, token, "alice"):
        assert bad not in text, bad
    assert redact_url(url) == "http://fake.local/v1?api_key=***&x=1"


def test_echoed_key_is_not_stored(tmp_path, monkeypatch):
    """A server that echoes the Authorization header: the key reaches no reply text,
    no raw response and no cache row."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    body = chat_body(f"you sent Authorization: Bearer {KEY}")
    body["echo"] = {"headers": {"authorization": f"Bearer {KEY}"}}
    cache = LLMCache(tmp_path / "c.sqlite")
    b = backend(Script((200, JSON, body)), cache=cache)
    res = chat(b)
    assert KEY not in res.text and "***" in res.text and KEY not in json.dumps(res.raw)
    rows = sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT value FROM responses").fetchall()
    assert rows and all(KEY not in v and KEY[:12] not in v for (v,) in rows)


def test_call_records(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Script((200, JSON, chat_body(pt=100, ct=10)), (400, JSON, {"error": {"message": "no"}}))
    b = backend(s, url="https://api.openai.com/v1", model="gpt-4o-mini",
                cache=LLMCache(tmp_path / "c.sqlite"))  # fmt: skip
    b.role = "explainer"

    async def calls():
        async def head(name, msg):
            label_calls(head=name)
            with contextlib.suppress(LLMError):
                await b.chat([{"role": "user", "content": msg}], max_tokens=5)

        await head("L0H1", "a")
        await asyncio.gather(head("L0H2", "a"), head("L0H3", "b"))

    asyncio.run(calls())
    recs = {r["head"]: r for r in b.calls}
    assert set(recs) == {"L0H1", "L0H2", "L0H3"}
    keys = {"head", "role", "model", "op", "prompt_tokens", "completion_tokens", "latency_s",
            "cost_usd", "cached", "start_time", "error"}  # fmt: skip
    assert all(set(r) == keys for r in b.calls)
    first = recs["L0H1"]
    assert (first["op"], first["role"], first["model"]) == ("chat", "explainer", "gpt-4o-mini")
    assert (first["prompt_tokens"], first["completion_tokens"], first["cached"]) == (100, 10, False)
    assert first["cost_usd"] == pytest.approx((100 * 0.15 + 10 * 0.6) / 1e6)
    assert recs["L0H2"]["cached"] and recs["L0H2"]["cost_usd"] == 0  # same request: a hit
    assert "400" in recs["L0H3"]["error"] and recs["L0H3"]["start_time"] > 1.7e9


def test_chat_expected_values_reads_values_not_keys():
    from head_explain.llm.base import TokenLogprob
    from head_explain.simulation_replies import (
        chat_expected_values,
        parse_chat_values,
        values_schema,
    )

    text = '{"1": 0, "2": 7}'
    toks = ['{"', "1", '":', " 0", ",", ' "', "2", '":', " 7", "}"]
    tops = {" 0": {"0": -0.1, "1": -2.4}, " 7": {"7": -0.01, "8": -5.0}}
    lps = [TokenLogprob(t, -0.1, tops.get(t, {"9": -0.1})) for t in toks]  # keys say 9
    ev = chat_expected_values(lps, 2, text)
    assert ev is not None and ev[0] < 0.2 and 6.9 < ev[1] < 7.1
    assert list(parse_chat_values(text, 2)) == [0, 7]
    assert list(parse_chat_values('{"2": 7, "1": 0}', 2)) == [0, 7]  # keys in any order
    schema = values_schema(2)
    assert schema["required"] == ["1", "2"] and schema["properties"]["1"]["enum"][-1] == 10


# --- echo parsing -------------------------------------------------------------------------
def echo_lp(tokens, tops):
    offs, o = [], 0
    for t in tokens:
        offs.append(o)
        o += len(t)
    return {"tokens": tokens, "text_offset": offs, "token_logprobs": [None] * len(tokens),
            "top_logprobs": tops}  # fmt: skip


def test_read_slots_openai_convention():
    prompt = "a: 5\nb: 7"
    lp = echo_lp(
        ["a", ":", " ", "5", "\n", "b", ":", " ", "7"],
        [None, {}, {}, {"5": -0.1, "6": -3.0, " x": -5}, {}, {}, {}, {},
         {"7": -0.2, " 7": -1.0, "10": -4.0}],
    )  # fmt: skip
    slots = read_slots(prompt, lp, [3, 8, 0], ["5", "6", "7", "10"], shift=0)
    assert slots[0] == {"5": -0.1, "6": -3.0}
    # "7" and " 7" are one answer: probabilities add up
    assert slots[1]["7"] == pytest.approx(math.log(math.exp(-0.2) + math.exp(-1.0)))
    assert slots[1]["10"] == -4.0
    assert slots[2] is None  # the first token has no distribution


def test_read_slots_shifted_and_glued_whitespace():
    # llama-cpp-python without BOS: top_logprobs[j] is the distribution AFTER token j
    prompt = "x 5 6"
    lp = echo_lp(["x", " 5", " 6"], [None, {" 6": -0.3, " 7": -2.0}, {"\n": -0.1}])
    # slot 2 is inside " 5" (glued space): the boundary before the space stands in
    slots = read_slots(prompt, lp, [2, 4, 5], ["5", "6", "7"], shift=1)
    assert slots[0] is None  # would be top[0], which echo responses leave empty
    assert slots[1] == {"6": -0.3, "7": -2.0}
    assert slots[2] is None  # no candidate among the top alternatives


def test_echo_alignment_detection():
    toks = ["1", " ", "2", " ", "3", " ", "4"]
    aligned = [None] + [{t: -0.1, "z": -3} for t in toks[1:]]
    shifted = [None] + [{t: -0.1, "z": -3} for t in toks[2:]] + [{"\n": -0.1}]
    assert echo_alignment("", echo_lp(toks, aligned)) == 0
    assert echo_alignment("", echo_lp(toks, shifted)) == 1


def test_chat_logprobs_legacy_format():
    choice = {"logprobs": {"tokens": ["a"], "token_logprobs": [-0.5],
                           "top_logprobs": [{"a": -0.5, "b": -1}]}}  # fmt: skip
    (t,) = chat_logprobs(choice)
    assert t.token == "a" and t.logprob == -0.5 and t.top == {"a": -0.5, "b": -1}


def test_no_echo_endpoint_is_reported(monkeypatch):
    s = Script((404, JSON, {"error": {"message": "no such endpoint"}}))
    b = backend(s)
    assert b.supports_echo() is False
    with pytest.raises(LLMError, match="does not return prompt logprobs.*simulation_method chat"):
        asyncio.run(b.score_prompt("1 2", [2], ["2"]))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    o = backend(s, url="https://api.openai.com/v1")
    n = len(s.calls)
    assert o.supports_echo() is False and len(s.calls) == n  # OpenAI: no probe needed


def test_score_prompt_via_fake_echo():
    lp = echo_lp(["1", " ", "2", " ", "3", " ", "4", " ", "5"],
                 [None] + [{"z": -0.1} for _ in range(8)])  # fmt: skip
    lp["top_logprobs"][4] = {"3": -0.2, "4": -2.0}  # aligned: distribution of token 4
    body = {"id": "x", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": "1 2 3 4 5", "finish_reason": "length",
                         "logprobs": lp}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}}  # fmt: skip
    s = Script((200, JSON, body))
    b = backend(s)
    assert b.supports_echo() is True and b._shift == 0
    res = asyncio.run(b.score_prompt("1 2 3 4 5", [4], ["3", "4"]))
    assert res.slots == [{"3": -0.2, "4": -2.0}] and res.prompt_tokens == 9
    assert json.loads(s.calls[-1].content)["echo"] is True


# --- cache --------------------------------------------------------------------------------
def test_cache_key_is_canonical():
    a = cache_key({"model": "m", "messages": [{"role": "user", "content": "x"}], "t": 0.0})
    b = cache_key({"t": 0.0, "messages": [{"content": "x", "role": "user"}], "model": "m"})
    assert a == b and len(a) == 64
    assert a != cache_key({"model": "m", "messages": [{"role": "user", "content": "x"}], "t": 1.0})


def test_backend_cache_hit_and_miss(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Script((200, JSON, chat_body("first")))
    cache = LLMCache(tmp_path / "c.sqlite")
    b = backend(s, cache=cache)
    r1 = chat(b, temperature=0)
    r2 = chat(b, temperature=0.0)  # 0 and 0.0 are the same request
    assert (r1.cached, r2.cached) == (False, True) and r2.text == "first"
    assert r2.logprobs == r1.logprobs and r2.prompt_tokens == 7
    assert (len(s.calls), b.stats.requests, b.stats.cache_hits) == (1, 1, 1)
    chat(b, temperature=0.5)  # a different request is a miss
    other = backend(s, cache=cache, url="http://other.local/v1")
    chat(other)  # so is the same request to another endpoint
    assert len(s.calls) == 3
    for (value,) in sqlite3.connect(tmp_path / "c.sqlite").execute("SELECT value FROM responses"):
        assert KEY not in value and KEY[:12] not in value
    asyncio.run(b.aclose())


def test_failures_are_not_cached(tmp_path):
    s = Script((400, JSON, {"error": {"message": "nope"}}), (200, JSON, chat_body()))
    b = backend(s, cache=LLMCache(tmp_path / "c.sqlite"))
    with pytest.raises(LLMError):
        chat(b)
    assert not chat(b).cached


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("HEAD_EXPLAIN_CACHE", str(tmp_path / "root"))
    assert resolve_path("") == tmp_path / "root" / "llm_cache.sqlite"
    assert resolve_path("off") is None and open_cache("off") is None
    assert resolve_path(str(tmp_path / "x.db")) == tmp_path / "x.db"
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="llm_cache"):
        open_cache(str(tmp_path / "junk.db"))


def test_cache_concurrent_threads(tmp_path):
    path = tmp_path / "c.sqlite"
    caches = [LLMCache(path) for _ in range(4)]

    def write(i):
        for j in range(40):
            caches[i % 4].put(f"k{i}-{j}", {"v": [i, j]})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(caches[0]) == 8 * 40
    assert caches[1].get("k7-39") == {"v": [7, 39]}


WRITER = """
import sys
from head_explain.llm.cache import LLMCache
c = LLMCache(sys.argv[1]); tag = sys.argv[2]; n = int(sys.argv[3])
i = 0
while n < 0 or i < n:
    c.put(f"{tag}-{i}", {"tag": tag, "i": i, "pad": "x" * 2000}); i += 1
"""


def test_cache_concurrent_processes_and_kill(tmp_path):
    path = tmp_path / "c.sqlite"
    LLMCache(path).close()
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"p{i}", "60"]) for i in range(3)
    ]
    victim = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "victim", "-1"])
    for p in procs:
        assert p.wait(timeout=60) == 0
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)  # killed mid-write
    victim.wait()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cache = LLMCache(path)
    for i in range(3):
        assert cache.get(f"p{i}-59")["i"] == 59
    killed = conn.execute("SELECT value FROM responses WHERE key LIKE 'victim-%'").fetchall()
    assert killed and all(json.loads(v)["tag"] == "victim" for (v,) in killed)


# --- pricing ------------------------------------------------------------------------------
def test_pricing(caplog):
    assert pricing.cost_usd("gpt-4o-mini", 1_000_000, 1_000_000, local=False) == pytest.approx(0.75)
    assert pricing.cost_usd("gpt-4o-2024-08-06", 1000, 500, local=False) == pytest.approx(
        (1000 * 2.5 + 500 * 10) / 1e6
    )
    assert pricing.price("gpt-4.1-nano").output_per_m == 0.40
    assert pricing.cost_usd("gpt-4o", 10**6, 0, local=True) == 0.0
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        assert pricing.cost_usd("mystery-model-xyz", 100, 100, local=False) == 0.0
    assert caplog.text.count("mystery-model-xyz") == 1


def test_cost_reaches_stats(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    s = Script((200, JSON, chat_body(pt=1000, ct=100)))
    b = backend(s, url="https://api.openai.com/v1", model="gpt-4.1-mini")
    res = chat(b)
    assert res.cost_usd == pytest.approx((1000 * 0.4 + 100 * 1.6) / 1e6)
    assert b.stats.as_dict()["cost_usd"] == pytest.approx(res.cost_usd)
    local = backend(s, model="gpt-4.1-mini")
    assert chat(local).cost_usd == 0.0
