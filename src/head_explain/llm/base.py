"""The one LLM interface the explainer and simulator use, whatever serves the model.

Two operations cover the method: `chat` (explain a head; simulate by asking for
numbers) and `score_prompt` (simulate by reading the model's next-token distribution
over "0".."10" at given places of one prompt, the cheaper and more faithful method
where the endpoint can score prompts). The base class owns what must not differ
between backends: the response cache, the statistics, and the validation of inputs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

from head_explain.llm.cache import LLMCache, cache_key

log = logging.getLogger(__name__)


@dataclass
class TokenLogprob:
    """One generated token, its log-probability and the top alternatives."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternative token -> logprob


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cost_usd: float
    cached: bool
    logprobs: list[TokenLogprob] | None
    raw: dict  # JSON-able response (never holds the API key)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], cached: bool) -> ChatResult:
        lps = d.get("logprobs")
        return cls(
            text=d["text"],
            prompt_tokens=int(d["prompt_tokens"]),
            completion_tokens=int(d["completion_tokens"]),
            latency_s=float(d["latency_s"]),
            cost_usd=float(d["cost_usd"]),
            cached=cached,
            logprobs=None if lps is None else [TokenLogprob(**t) for t in lps],
            raw=d.get("raw") or {},
        )


@dataclass
class ScoreResult:
    """Per slot: candidate -> logprob (only candidates found); None if unreadable."""

    slots: list[dict[str, float] | None]
    prompt_tokens: int
    latency_s: float
    cost_usd: float
    cached: bool

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], cached: bool) -> ScoreResult:
        return cls(
            slots=d["slots"],
            prompt_tokens=int(d["prompt_tokens"]),
            latency_s=float(d["latency_s"]),
            cost_usd=float(d["cost_usd"]),
            cached=cached,
        )


@dataclass
class LLMStats:
    """Counters for one backend. Cache hits are not requests and cost nothing new."""

    requests: int = 0  # requests sent (a retried request counts once)
    cache_hits: int = 0
    retries: int = 0  # extra attempts after a transient error
    failures: int = 0  # requests that finally failed
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def logsumexp(values: list[float]) -> float:
    m = max(values)
    if m == -math.inf:
        return m
    return m + math.log(sum(math.exp(v - m) for v in values))


def check_slots(prompt: str, slot_offsets: list[int]) -> None:
    for off in slot_offsets:
        if not isinstance(off, int) or not 0 <= off <= len(prompt):
            raise ValueError(f"slot offset {off!r} is outside the prompt (0..{len(prompt)})")


class LLMBackend(ABC):
    """Cache + stats around a backend's `_chat` / `_score`; subclasses only talk."""

    kind: str = ""
    model: str = ""

    def __init__(self, model: str, cache: LLMCache | None, concurrency: int = 4):
        self.model = model
        self.stats = LLMStats()
        self._cache = cache
        self._concurrency = max(1, int(concurrency))
        self._sems: dict[int, asyncio.Semaphore] = {}

    # --- what subclasses provide --------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What, besides the request, determines an answer (part of every cache key)."""
        return {"kind": self.kind, "model": self.model, "base_url": ""}

    @abstractmethod
    def supports_echo(self) -> bool:
        """Whether `score_prompt` works here."""

    @abstractmethod
    async def _chat(
        self, messages: list[dict], max_tokens: int, temperature: float, top_logprobs: int
    ) -> ChatResult: ...

    @abstractmethod
    async def _score(
        self, prompt: str, slot_offsets: list[int], candidates: list[str]
    ) -> ScoreResult: ...

    async def aclose(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    # --- shared machinery ------------------------------------------------------------
    def semaphore(self) -> asyncio.Semaphore:
        """One semaphore per event loop: a backend may outlive one `asyncio.run`."""
        loop = asyncio.get_running_loop()
        sem = self._sems.get(id(loop))
        if sem is None:
            self._sems = {id(loop): asyncio.Semaphore(self._concurrency)}
            sem = self._sems[id(loop)]
        return sem

    def _lookup(self, payload: dict[str, Any]) -> tuple[str | None, dict | None]:
        if self._cache is None:
            return None, None
        key = cache_key({**self.identity(), **payload})
        hit = self._cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
        return key, hit

    def _account(self, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.cost_usd += cost

    async def chat(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_logprobs: int = 0,
    ) -> ChatResult:
        """One chat completion; a cached answer comes back with cached=True."""
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        payload = {
            "op": "chat",
            "messages": msgs,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "top_logprobs": int(top_logprobs),
        }
        key, hit = self._lookup(payload)
        if hit is not None:
            return ChatResult.from_json(hit, cached=True)
        self.stats.requests += 1
        try:
            res = await self._chat(msgs, int(max_tokens), float(temperature), int(top_logprobs))
        except Exception:
            self.stats.failures += 1
            raise
        self._account(res.prompt_tokens, res.completion_tokens, res.cost_usd)
        if key is not None:
            self._cache.put(key, res.to_json())  # type: ignore[union-attr]
        return res

    async def score_prompt(
        self, prompt: str, slot_offsets: list[int], candidates: list[str]
    ) -> ScoreResult:
        """Log-probabilities that the token starting at each slot offset is each candidate.

        `slot_offsets` are character offsets into `prompt`. Candidates that are not a
        single token (or not found among the endpoint's top alternatives) are left out
        of a slot's dict; a slot that cannot be read at all is None.
        """
        slot_offsets = [int(o) for o in slot_offsets]
        check_slots(prompt, slot_offsets)
        payload = {
            "op": "score",
            "prompt": prompt,
            "slot_offsets": slot_offsets,
            "candidates": list(candidates),
        }
        key, hit = self._lookup(payload)
        if hit is not None:
            return ScoreResult.from_json(hit, cached=True)
        self.stats.requests += 1
        try:
            res = await self._score(prompt, slot_offsets, list(candidates))
        except Exception:
            self.stats.failures += 1
            raise
        self._account(res.prompt_tokens, 0, res.cost_usd)
        if key is not None:
            self._cache.put(key, res.to_json())  # type: ignore[union-attr]
        return res


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
