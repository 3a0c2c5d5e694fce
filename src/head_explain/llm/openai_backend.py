"""OpenAI, or any server that speaks its API (llama.cpp, vLLM, ...), via the official client.

The client's own retries are off: every request goes through the one retry policy of
llm/policy.py (tenacity), so that each retry is counted in the run's statistics,
Retry-After is honoured with jitter, a truncated or non-JSON body (a proxy hiccup) is
retried like a 5xx, and transport faults and unusable replies share one budget: a call
costs at most `max_retries + 1` requests. This module only says which errors are
transient (`is_retryable`) and how long the server asked us to wait (`retry_after_s`).
A request that times out doubles the timeout of the requests after it (`_timed`).
The API key is passed to the client and nowhere else: every message we raise or log
goes through `redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from head_explain.errors import LLMError
from head_explain.llm.cache import LLMCache
from head_explain.llm.openai_echo import ECHO_LOGPROBS, EchoProbing
from head_explain.llm.openai_parse import (
    MalformedResponse,
    as_dict,
    chat_logprobs,
    describe,
    echo_alignment,
    echo_logprobs,
    is_retryable,
    read_slots,
    rejects_format,
    response_format,
    retry_after_s,
    schema_formats,
)
from head_explain.llm.openai_urls import (
    DUMMY_KEY,
    OPENAI_URL,
    api_key_for,
    client_url,
    install_log_filter,
    is_openai_url,
    missing_key_message,
    one_line,
    redact,
    redact_json,
    redact_url,
    resolve_base_url,
    url_secrets,
)
from head_explain.llm.policy import backoff_s
from head_explain.llm.pricing import cost_usd
from head_explain.llm.results import ChatOptions, ChatResult, ScoreResult

log = logging.getLogger(__name__)

TIMEOUT_STRETCH_MAX = 8  # a timeout doubles the next requests' timeout, up to 8 x llm_timeout_s

# Re-exported: callers and tests import these from here (their homes: openai_urls.py,
# openai_parse.py, policy.py).
__all__ = [
    "DUMMY_KEY", "OPENAI_URL", "MalformedResponse", "OpenAIBackend", "api_key_for",
    "backoff_s", "chat_logprobs", "client_url", "describe", "echo_alignment",
    "install_log_filter", "is_openai_url", "is_retryable", "missing_key_message",
    "one_line", "read_slots", "redact", "redact_json", "redact_url", "resolve_base_url",
    "retry_after_s", "url_secrets",
]  # fmt: skip


# --- the backend ------------------------------------------------------------------------
class OpenAIBackend(EchoProbing):
    kind = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "",
        timeout_s: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 4,
        cache: LLMCache | None = None,
        http_client: Any = None,
        sync_http_client: Any = None,
    ):
        super().__init__(model, cache, concurrency)
        self.base_url, _ = resolve_base_url(base_url)
        self.shown_url = redact_url(self.base_url)  # what logs and errors name
        self.local = not is_openai_url(self.base_url)
        key = api_key_for(self.base_url)
        if key is None:
            raise LLMError(missing_key_message())
        self._key = key
        self._secrets = url_secrets(self.base_url)
        self._client_url, self._query, _ = client_url(self.base_url)
        install_log_filter()
        self._schema_formats = list(schema_formats(self.base_url))  # see _chat
        self.timeout_s = float(timeout_s)
        self.timeout_now = self.timeout_s  # what the next request waits (see _timed)
        self.max_retries = int(max_retries)
        self._http_client = http_client  # tests inject transports here
        self._sync_http_client = sync_http_client
        self._client: Any = None
        self._client_loop: int | None = None
        self._echo: bool | None = False if not self.local else None
        self._shift = 0  # see echo_alignment
        self._echo_why = "" if self.local else " (OpenAI's API no longer combines them)"
        self._probe_lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "base_url": self.base_url}

    def _what(self, op: str) -> str:
        return f"{op} (model '{self.model}' at {self.shown_url})"

    def _redact(self, text: str) -> str:
        return redact(text, self._key, self._secrets)

    # --- the retry policy's questions (llm/policy.py) ---------------------------------
    def is_transient(self, exc: BaseException) -> bool:
        return is_retryable(exc)

    def is_throttle(self, exc: BaseException) -> bool:
        return getattr(exc, "status_code", None) == 429

    def is_timeout(self, exc: BaseException) -> bool:
        import openai

        return isinstance(exc, openai.APITimeoutError)  # the client wraps transport timeouts

    async def _timed(self, create: Any, **request: Any) -> Any:
        """`await create(**request)` under the current timeout. A request that times out
        doubles it for the requests after it, up to TIMEOUT_STRETCH_MAX x llm_timeout_s.

        Why: a local server keeps computing a request its client gave up on. A retry with
        the same timeout queues behind it and times out too; llama-cpp-python's echo
        (20-60 s a prompt on 2 slow cores) built such a backlog at the default 60 s that
        a whole simulate stage failed. Requests that timed out together (sent with the
        same timeout) stretch it once.
        """
        sent = self.timeout_now
        try:
            return await create(timeout=sent, **request)
        except Exception as exc:
            cap = self.timeout_s * TIMEOUT_STRETCH_MAX
            if self.is_timeout(exc) and sent >= self.timeout_now and sent < cap:
                self.timeout_now = min(cap, 2 * sent)
                log.warning("%s: a request timed out after %.0fs; the next wait up to %.0fs "
                            "(llm_timeout_s %g)", self.shown_url, sent, self.timeout_now,
                            self.timeout_s)  # fmt: skip
            raise

    def retry_after(self, exc: BaseException) -> float | None:
        return retry_after_s(exc)

    def describe(self, exc: BaseException) -> str:
        return describe(exc)

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        return cost_usd(self.model, prompt_tokens, completion_tokens, local=self.local)

    def client(self) -> Any:
        """The async client of the running loop (connection pools are loop-bound)."""
        from openai import AsyncOpenAI

        loop = id(asyncio.get_running_loop())
        if self._client is None or (self._client_loop != loop and self._http_client is None):
            self._client = AsyncOpenAI(
                api_key=self._key,
                base_url=self._client_url,
                default_query=self._query or None,
                timeout=self.timeout_s,
                max_retries=0,
                http_client=self._http_client,
            )
            self._client_loop = loop
        return self._client

    async def _chat(self, messages: list[dict], opts: ChatOptions) -> ChatResult:
        json_schema = opts.json_schema
        kwargs: dict[str, Any] = {}
        if opts.top_logprobs > 0:
            kwargs = {"logprobs": True, "top_logprobs": opts.top_logprobs}
        if opts.seed is not None:
            kwargs["seed"] = opts.seed
        t0 = time.perf_counter()
        while True:
            fmt = self._schema_formats[0] if json_schema and self._schema_formats else None
            extra = {"response_format": response_format(fmt, json_schema)} if fmt else {}
            try:
                resp = await self._timed(
                    self.client().chat.completions.create, model=self.model, messages=messages,
                    max_tokens=opts.max_tokens, temperature=opts.temperature, **kwargs, **extra,
                )  # fmt: skip
                break
            except Exception as exc:
                if fmt is None or not rejects_format(exc):
                    raise
                # This endpoint does not take that form of schema: try the next form, at
                # last free text (the validator still checks the reply). Not a retry.
                log.info("%s: response_format %s not accepted (%s)", self.shown_url, fmt,
                         one_line(self._redact(describe(exc)), 160))  # fmt: skip
                if self._schema_formats and self._schema_formats[0] == fmt:
                    self._schema_formats.pop(0)
        raw = as_dict(resp)
        choices = raw.get("choices") or []
        if not choices or not isinstance(choices[0].get("message"), dict):
            raise MalformedResponse(f"no choices in the response: {one_line(str(raw), 120)}")
        raw = redact_json(raw, self._key, self._secrets)  # echoed headers stay off disk
        choice = raw["choices"][0]
        usage = raw.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return ChatResult(
            text=choice["message"].get("content") or "",
            prompt_tokens=pt,
            completion_tokens=ct,
            latency_s=time.perf_counter() - t0,
            cost_usd=cost_usd(self.model, pt, ct, local=self.local),
            cached=False,
            logprobs=chat_logprobs(choice),
            raw=raw,
        )

    async def _score(
        self, prompt: str, slot_offsets: list[int], candidates: list[str]
    ) -> ScoreResult:
        if self._echo is None:
            await asyncio.to_thread(self.supports_echo)
        if not self._echo:
            raise self._no_echo(self._echo_why)
        t0 = time.perf_counter()
        resp = await self._timed(
            self.client().completions.create, model=self.model, prompt=prompt, echo=True,
            logprobs=ECHO_LOGPROBS, max_tokens=1, temperature=0,
        )  # fmt: skip
        raw = as_dict(resp)
        if not raw.get("choices"):
            raise MalformedResponse(f"no choices in the response: {one_line(str(raw), 120)}")
        lp = echo_logprobs(raw)
        if lp is None:  # the probe saw them: this reply is broken
            raise MalformedResponse("no prompt logprobs in the response")
        usage = raw.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return ScoreResult(
            slots=read_slots(prompt, lp, slot_offsets, candidates, self._shift),
            prompt_tokens=pt,
            latency_s=time.perf_counter() - t0,
            cost_usd=cost_usd(self.model, pt, ct, local=self.local),
            cached=False,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # a closed loop's client cannot close
                await self._client.close()
            self._client = None
        await super().aclose()
