"""Whether an OpenAI-compatible endpoint can score prompts: one probe of
/v1/completions with echo=true and logprobs (remembered in the response cache, so a
cached rerun sends nothing), and how its prompt logprobs align (see echo_alignment)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import tenacity

from head_explain.errors import LLMError
from head_explain.llm.base import LLMBackend
from head_explain.llm.cache import cache_key
from head_explain.llm.openai_parse import (
    as_dict,
    describe,
    echo_alignment,
    echo_logprobs,
    is_retryable,
    retry_after_s,
)
from head_explain.llm.openai_urls import one_line
from head_explain.llm.policy import retry_policy

log = logging.getLogger(__name__)

ECHO_LOGPROBS = 10  # top alternatives per prompt token (llama.cpp / vLLM accept 10+)
ECHO_PROBE_PROMPT = "1 2 3 4 5"  # short: echo is slow on llama.cpp


class EchoProbing(LLMBackend):
    """The echo probe of `OpenAIBackend` (which sets these attributes)."""

    shown_url: str
    timeout_s: float
    _key: str
    _client_url: str
    _query: dict[str, str]
    _sync_http_client: Any
    _echo: bool | None  # None: not probed yet
    _shift: int  # see echo_alignment
    _echo_why: str
    _probe_lock: threading.Lock

    def _no_echo(self, why: str = "") -> LLMError:
        return LLMError(
            one_line(
                f"{self._what('score_prompt')}: the endpoint does not return prompt logprobs "
                f"(/v1/completions with echo=true and logprobs){why}; use "
                "--simulation_method chat",
                400,
            )
        )

    def supports_echo(self) -> bool:
        """Probe /v1/completions with echo+logprobs once; OpenAI's own API: False."""
        if self._echo is not None:
            return self._echo
        with self._probe_lock:
            if self._echo is None and not self._probe_from_cache():
                self._probe()
                self._store_probe()
        return bool(self._echo)

    def _probe_key(self) -> str:
        return cache_key({**self.identity(), "probe": "echo", "prompt": ECHO_PROBE_PROMPT})

    def _probe_from_cache(self) -> bool:
        """A definitive probe verdict from an earlier run: a cached rerun sends nothing."""
        if self._cache is None:
            return False
        hit = self._cache.get(self._probe_key())
        if hit is None:
            return False
        self._echo, self._shift, self._echo_why = hit["echo"], hit["shift"], hit["why"]
        self.stats.cache_hits += 1
        return True

    def _store_probe(self) -> None:
        if self._cache is not None and self._echo is not None:
            value = {"echo": self._echo, "shift": self._shift, "why": self._echo_why}
            self._cache.put(self._probe_key(), value)

    def _probe(self) -> None:
        import openai

        client = openai.OpenAI(
            api_key=self._key, base_url=self._client_url, default_query=self._query or None,
            timeout=self.timeout_s, max_retries=0, http_client=self._sync_http_client,
        )  # fmt: skip

        def on_retry(state: tenacity.RetryCallState, delay: float) -> None:
            self.stats.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s", one_line(self._redact(
                f"{self._what('echo probe')}: {describe(exc) if exc else '?'}; retry "
                f"{state.attempt_number}/{self.max_retries} in {delay:.1f}s")))  # fmt: skip

        policy = retry_policy(
            max_retries=self.max_retries, transient=is_retryable, retry_after=retry_after_s,
            on_retry=on_retry,
        )  # fmt: skip
        tries = 0
        try:
            for attempt in tenacity.Retrying(sleep=time.sleep, **policy):
                with attempt:
                    tries = attempt.retry_state.attempt_number
                    resp = client.completions.create(
                        model=self.model, prompt=ECHO_PROBE_PROMPT, echo=True, logprobs=1,
                        max_tokens=1, temperature=0,
                    )  # fmt: skip
                    lp = echo_logprobs(as_dict(resp))
        except Exception as exc:
            why = one_line(self._redact(describe(exc)), 200)
            if is_retryable(exc):  # transient to the end: do not remember an answer
                tried = f" after {tries - 1} retries" if tries > 1 else ""
                raise LLMError(f"{self._what('echo probe')} failed{tried}: {why}") from None
            log.info("no echo logprobs at %s: %s", self.shown_url, why)
            self._echo, self._echo_why = False, f" ({why})"
            return
        finally:
            if self._sync_http_client is None:
                client.close()
        if lp is None or len(lp["tokens"]) < 4:
            self._echo = False
            return
        self._shift = echo_alignment(ECHO_PROBE_PROMPT, lp)
        self._echo = True
        log.info("echo logprobs at %s (alignment shift %d)", self.shown_url, self._shift)
