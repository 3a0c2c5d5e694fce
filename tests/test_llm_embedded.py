"""The embedded backend with the real bundled SmolLM2 (CPU, offline)."""

from __future__ import annotations

import asyncio
import math

import pytest

from head_explain.llm.cache import LLMCache
from head_explain.llm.embedded import MODEL_NAME, EmbeddedBackend

pytestmark = pytest.mark.slow

DIGITS = [str(i) for i in range(11)]
COUNT = "1 2 3 4 5 6 7 8"
SPACES = [i + 1 for i, c in enumerate(COUNT) if c == " "]


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    b = EmbeddedBackend(cache=LLMCache(tmp_path_factory.mktemp("llm") / "cache.sqlite"))
    yield b
    asyncio.run(b.aclose())


def test_chat_returns_text_counts_and_logprobs(emb):
    msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
    res = asyncio.run(emb.chat(msgs, max_tokens=8, top_logprobs=3))
    assert emb.model == MODEL_NAME and emb.kind == "embedded"
    assert res.text.strip() and not res.cached and res.cost_usd == 0.0
    assert res.prompt_tokens > 10 and 0 < res.completion_tokens <= 8
    assert len(res.logprobs) == res.completion_tokens
    first = res.logprobs[0]
    assert len(first.top) <= 3 and first.token in first.top  # greedy: the top-1 token
    assert first.logprob == pytest.approx(max(first.top.values()), abs=1e-4)


def test_score_prompt_counts(emb):
    res = asyncio.run(emb.score_prompt(COUNT, SPACES, DIGITS))
    assert emb.supports_echo() and len(res.slots) == len(SPACES)
    assert res.prompt_tokens == 15
    for slot in res.slots:
        assert "10" not in slot  # two tokens in this vocabulary: omitted
        assert set(slot) == set(DIGITS) - {"10"}
        assert sum(math.exp(v) for v in slot.values()) <= 1 + 1e-5
    for off, slot in list(zip(SPACES, res.slots, strict=True))[3:]:
        best = max(slot, key=slot.get)
        assert best == COUNT[off] and math.exp(slot[best]) > 0.5


def test_slot_at_start_and_end(emb):
    res = asyncio.run(emb.score_prompt("9 8 7 6 5 ", [0, 10], DIGITS))
    assert res.slots[0] is None  # nothing precedes offset 0
    assert max(res.slots[1], key=res.slots[1].get) == "4"


def test_concurrent_scoring_equals_single_bit_for_bit(emb):
    """A prompt's numbers do not depend on what is scored beside it (issue 12: a cached
    or resumed rerun must give byte-identical scores)."""
    prompts = ["2 4 6 8 10 12", "a b c d e", "Score: 7/10. Next score: 3"]
    offsets = [[2, 6], [8], [7, len(prompts[2]) - 1]]
    emb._cache, cache = None, emb._cache  # measure the model, not the cache
    try:
        single = [
            asyncio.run(emb.score_prompt(p, o, DIGITS))
            for p, o in zip(prompts, offsets, strict=True)
        ]

        async def together():
            return await asyncio.gather(
                *(emb.score_prompt(p, o, DIGITS) for p, o in zip(prompts, offsets, strict=True))
            )

        batched = asyncio.run(together())
    finally:
        emb._cache = cache
    for a, b in zip(single, batched, strict=True):
        for sa, sb in zip(a.slots, b.slots, strict=True):
            assert sa.keys() == sb.keys()
            assert sa == sb  # exactly, not approximately


def test_cache_hit_makes_no_request(emb):
    msgs = [{"role": "user", "content": "Say yes."}]
    before = emb.stats.requests
    a = asyncio.run(emb.chat(msgs, max_tokens=4))
    b = asyncio.run(emb.chat(msgs, max_tokens=4))
    s1 = asyncio.run(emb.score_prompt("1 2 3", [2], DIGITS))
    s2 = asyncio.run(emb.score_prompt("1 2 3", [2], DIGITS))
    assert (a.cached, b.cached, s1.cached, s2.cached) == (False, True, False, True)
    assert b.text == a.text and s2.slots == s1.slots
    assert emb.stats.requests == before + 2 and emb.stats.cache_hits >= 2


def test_shared_prefix_reuses_its_kv_cache_and_stays_deterministic(emb):
    """A prompt that starts with a shared prefix is scored from the prefix's KV cache:
    the same numbers as a full pass up to float rounding, and the same bits every time."""
    from head_explain import prompts, simulate
    from head_explain.llm.embedded import engine

    tpl = prompts.load(simulate.ECHO_PROMPT)
    prefix = tpl.text.split("$explanation")[0].rstrip()
    prompt, slots = simulate.build_echo_prompt(tpl, "attends to commas.", ["a", ",", " b"])
    emb._cache, cache = None, emb._cache
    try:
        eng = engine()
        eng.prefixes.clear()
        full = asyncio.run(emb.score_prompt(prompt, slots, DIGITS))
        asyncio.run(emb.share_prefix(prefix))
        assert len(eng.prefixes) == 1
        ids, _ = eng.encode_slots(prompt, slots)
        assert eng._prefix_of(ids, [len(ids) - 1]) is not None  # the prompt uses it
        a = asyncio.run(emb.score_prompt(prompt, slots, DIGITS))
        b = asyncio.run(emb.score_prompt(prompt, slots, DIGITS))
    finally:
        emb._cache = cache
    assert a.slots == b.slots  # deterministic, bit for bit
    for sf, sa in zip(full.slots, a.slots, strict=True):
        assert sf.keys() == sa.keys()
        assert max(abs(sf[k] - sa[k]) for k in sf) < 1e-3


def test_stop_pattern_ends_generation_early_with_the_same_tokens(emb):
    """Greedy decoding with a stop pattern: the reply is the unstopped reply's beginning,
    up to the token that completes the match, in fewer generated tokens."""
    import re

    msgs = [{"role": "user", "content": "Write three short sentences about cats."}]
    full = asyncio.run(emb.chat(msgs, max_tokens=48))
    stopped = asyncio.run(emb.chat(msgs, max_tokens=48, stop_pattern=r"[.!?]\s"))
    assert re.search(r"[.!?]\s", full.text), full.text  # the reply has a sentence end
    assert full.text.startswith(stopped.text) and re.search(r"[.!?]\s", stopped.text)
    assert stopped.completion_tokens < full.completion_tokens
    assert not stopped.cached  # its own cache entry: the pattern is part of the key
