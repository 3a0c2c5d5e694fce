"""The one LLM interface the explainer and simulator use, whatever serves the model.

Two operations cover the method: `chat` (explain a head; simulate by asking for
numbers) and `score_prompt` (simulate by reading the model's next-token distribution
over "0".."10" at given places of one prompt, the cheaper and more faithful method
where the endpoint can score prompts). The base class owns what must not differ
between backends: the response cache, the statistics, the validation of inputs, and
the validation of replies: a caller's `validate` rejects an unusable reply (empty,
wrong shape, out of range) by raising ValueError; such a reply is not cached as an
answer and the call is retried once, varied (llm/policy.py: one retry policy for
transient errors and unusable replies, at most `max_retries + 1` requests per call).
When the retries end on a rejected reply (not on a transport error), that reply is
remembered in the cache as unusable, with the reason: a later call with the same key
fails at once without a request (see llm/cache.py for why).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from head_explain.llm.fetch import CachedFetcher, CostLimitReached
from head_explain.llm.policy import VARIED, backoff_s
from head_explain.llm.records import label_calls
from head_explain.llm.results import (
    ChatOptions,
    ChatResult,
    LLMStats,
    ScoreResult,
    TokenLogprob,
    chat_payload,
    check_slots,
    logsumexp,
    score_payload,
)

# Re-exported: callers and tests import these from here (their homes: results.py,
# records.py, fetch.py, policy.py).
__all__ = [
    "ChatOptions",
    "ChatResult",
    "CostLimitReached",
    "LLMBackend",
    "LLMStats",
    "ScoreResult",
    "TokenLogprob",
    "backoff_s",
    "chat_payload",
    "check_slots",
    "label_calls",
    "logsumexp",
    "score_payload",
]


class LLMBackend(CachedFetcher, ABC):
    """Cache + stats around a backend's `_chat` / `_score`; subclasses only talk."""

    kind: str = ""

    # --- what subclasses provide --------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What, besides the request, determines an answer (part of every cache key)."""
        return {"kind": self.kind, "model": self.model, "base_url": ""}

    async def share_prefix(self, text: str) -> None:
        """A hint: many prompts will start with `text` (a backend may reuse its work)."""
        return None  # remote endpoints cache prompt prefixes themselves, if at all

    @abstractmethod
    def supports_echo(self) -> bool:
        """Whether `score_prompt` works here."""

    @abstractmethod
    async def _chat(self, messages: list[dict], opts: ChatOptions) -> ChatResult:
        """One attempt, no retries (`_fetch` retries)."""

    @abstractmethod
    async def _score(
        self, prompt: str, slot_offsets: list[int], candidates: list[str]
    ) -> ScoreResult: ...

    async def aclose(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    async def chat(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: int = 0,
        validate: Callable[[ChatResult], None] | None = None,
        json_schema: dict | None = None,
        stop_pattern: str = "",
    ) -> ChatResult:
        """One chat completion; a cached answer comes back with cached=True.

        `validate(result)` raising ValueError marks a reply unusable: it is not cached
        as an answer and the call is retried; when the retries are spent, LLMError
        ("unusable reply after N tries: <reason>") and the last reply is remembered as
        unusable, so the same call later raises LLMError("unusable reply (cached):
        <reason>") without a request. A cached usable reply it rejects is asked again.
        `json_schema` constrains the reply where the endpoint supports it;
        `stop_pattern` ends an in-process generation early (see ChatOptions).
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        payload = chat_payload(
            messages, max_tokens, temperature, top_logprobs, json_schema, stop_pattern
        )
        msgs = payload["messages"]
        opts = ChatOptions(
            int(max_tokens), float(temperature), int(top_logprobs), None, json_schema,
            stop_pattern,
        )  # fmt: skip
        varied = ChatOptions(
            opts.max_tokens, VARIED["temperature"], opts.top_logprobs, VARIED["seed"], json_schema,
            stop_pattern,
        )  # fmt: skip
        return await self._recorded(
            "chat",
            lambda: self._call(
                "chat",
                payload,
                ChatResult.from_json,
                validate,
                lambda is_varied: self._chat(msgs, varied if is_varied else opts),
                lambda r: self._account(r.prompt_tokens, r.completion_tokens, r.cost_usd),
                # at most: chars/4 prompt tokens (+4 per message), max_tokens in reply
                self.price(sum(len(m["content"]) // 4 + 4 for m in msgs), int(max_tokens)),
            ),
        )

    async def score_prompt(
        self,
        prompt: str,
        slot_offsets: list[int],
        candidates: list[str],
        *,
        validate: Callable[[ScoreResult], None] | None = None,
    ) -> ScoreResult:
        """Log-probabilities that the token starting at each slot offset is each candidate.

        `slot_offsets` are character offsets into `prompt`. Candidates that are not a
        single token (or not found among the endpoint's top alternatives) are left out
        of a slot's dict; a slot that cannot be read at all is None. `validate` works as
        in `chat`.
        """
        slot_offsets = [int(o) for o in slot_offsets]
        check_slots(prompt, slot_offsets)
        payload = score_payload(prompt, slot_offsets, candidates)
        return await self._recorded(
            "score",
            lambda: self._call(
                "score_prompt",
                payload,
                ScoreResult.from_json,
                validate,
                lambda varied: self._score(prompt, slot_offsets, list(candidates)),
                lambda r: self._account(r.prompt_tokens, 0, r.cost_usd),
                self.price(len(prompt) // 4 + 1, 1),
            ),
        )
