"""The openai backend against a real OpenAI-compatible server (llama.cpp, bundled model).

Echo scoring runs at roughly 15 prompt tokens/s on that server, so prompts stay short.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time

import pytest

from head_explain import config
from head_explain.errors import LLMError
from head_explain.llm import check_ready, make_backend

pytestmark = [pytest.mark.slow, pytest.mark.llama_server]

DIGITS = [str(i) for i in range(11)]
MODEL = "smollm2-135m-instruct"


@pytest.fixture()
def backend(llama_server, tmp_path):
    cfg = config.build(
        {"llm": "openai", "openai_base_url": llama_server, "openai_model": MODEL,
         "llm_cache": str(tmp_path / "cache.sqlite"), "llm_max_retries": 1}
    )  # fmt: skip
    b = make_backend(cfg, "simulator")
    yield b
    asyncio.run(b.aclose())


def test_chat_with_logprobs(backend):
    msgs = [{"role": "user", "content": "Name a colour. One word."}]
    res = asyncio.run(backend.chat(msgs, max_tokens=6, top_logprobs=3))
    assert backend.kind == "openai" and backend.model == MODEL
    assert res.text.strip() and res.prompt_tokens > 5 and 0 < res.completion_tokens <= 6
    assert res.cost_usd == 0.0 and res.raw["choices"][0]["message"]["content"] == res.text
    assert res.logprobs and res.logprobs[0].top and res.logprobs[0].logprob <= 0
    again = asyncio.run(backend.chat(msgs, max_tokens=6, top_logprobs=3))
    assert again.cached and again.text == res.text
    assert backend.stats.requests == 1 and backend.stats.cache_hits == 1


def test_score_prompt_via_echo(backend):
    assert backend.supports_echo() is True
    prompt = "1 2 3 4 5 6 7"
    slots = [i + 1 for i, c in enumerate(prompt) if c == " "]
    res = asyncio.run(backend.score_prompt(prompt, slots, DIGITS))
    assert len(res.slots) == len(slots) and res.prompt_tokens >= 13
    for off, slot in list(zip(slots, res.slots, strict=True))[3:]:
        assert slot is not None and sum(math.exp(v) for v in slot.values()) <= 1 + 1e-4
        best = max(slot, key=slot.get)
        assert best == prompt[off] and math.exp(slot[best]) > 0.5


def test_check_ready_passes_for_running_server(llama_server):
    check_ready(config.build({"llm": "openai", "openai_base_url": llama_server}))


def test_check_ready_unreachable_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    with pytest.raises(LLMError) as info:
        check_ready(config.build({"llm": "openai", "openai_base_url": url}))
    msg = str(info.value)
    assert url in msg and "does not answer" in msg and "\n" not in msg
    assert time.monotonic() - t0 < 10


def test_check_ready_missing_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(LLMError) as info:
        check_ready(config.build({"llm": "openai"}))
    msg = str(info.value)
    assert "OPENAI_API_KEY" in msg and "--llm embedded" in msg and "\n" not in msg
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        make_backend(config.build({"llm": "openai", "llm_cache": "off"}), "explainer")
