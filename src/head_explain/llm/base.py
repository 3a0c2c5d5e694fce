"""The one LLM interface the explainer and simulator use, whatever serves the model.

Two operations cover the method: `chat` (explain a head; simulate by asking for
numbers) and `score_prompt` (simulate by reading the model's next-token distribution
over "0".."10" at given places of one prompt, the cheaper and more faithful method
where the endpoint can score prompts). The base class owns what must not differ
between backends: the response cache, the statistics, the validation of inputs, and
the validation of replies: a caller's `validate` rejects an unusable reply (empty,
wrong shape, out of range) by raising ValueError; such a reply is not cached as an
answer and the call is retried within the same retry budget as transient errors
(`RetryBudget`). When the budget runs out on a rejected reply (not on a transport
error), that reply is remembered in the cache as unusable, with the reason: a later
call with the same key fails at once without a request (see llm/cache.py for why).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from head_explain.errors import LLMError
from head_explain.llm.cache import LLMCache, cache_key

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 120.0

R = TypeVar("R")


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


def backoff_s(attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): full-jitter exponential backoff,
    but never shorter than the server's Retry-After (plus up to 10% jitter)."""
    rng = rng or random
    exp = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    delay = exp * (0.5 + 0.5 * rng.random())
    if retry_after is not None:
        wait = min(retry_after, RETRY_AFTER_CAP_S)
        delay = max(delay, wait * (1 + 0.1 * rng.random()))
    return delay


@dataclass
class RetryBudget:
    """The retries one logical call may still spend, shared by every layer that retries
    it (transport errors in a backend, unusable replies here): a call costs at most
    `total + 1` requests, whatever mix of faults it meets."""

    total: int
    used: int = 0

    @property
    def left(self) -> int:
        return max(0, self.total - self.used)


_BUDGET: ContextVar[RetryBudget | None] = ContextVar("head_explain_llm_budget", default=None)


def current_budget() -> RetryBudget | None:
    """The budget of the logical call this coroutine serves (None outside `chat`/`score`)."""
    return _BUDGET.get()


def check_slots(prompt: str, slot_offsets: list[int]) -> None:
    for off in slot_offsets:
        if not isinstance(off, int) or not 0 <= off <= len(prompt):
            raise ValueError(f"slot offset {off!r} is outside the prompt (0..{len(prompt)})")


class LLMBackend(ABC):
    """Cache + stats around a backend's `_chat` / `_score`; subclasses only talk."""

    kind: str = ""
    model: str = ""
    # Retries of one call (transient errors and unusable replies together). 0 here: a
    # local deterministic model gives the same unusable reply again; remote backends set it.
    max_retries: int = 0

    def __init__(self, model: str, cache: LLMCache | None, concurrency: int = 4):
        self.model = model
        self.stats = LLMStats()
        self._cache = cache
        self._concurrency = max(1, int(concurrency))
        self._sems: dict[int, asyncio.Semaphore] = {}
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep  # tests record delays

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

    def _redact(self, text: str) -> str:
        """Text fit for logs and errors (backends holding a secret override this)."""
        return text

    def _cached(
        self,
        payload: dict[str, Any],
        parse: Callable[[dict], R],
        validate: Callable[[R], None] | None,
        op: str,
    ) -> tuple[str | None, R | None]:
        """(cache key, the cached result if there is a usable one). A key remembered as
        unusable raises its LLMError here: a cache hit and a failure, no request."""
        if self._cache is None:
            return None, None
        key = cache_key({**self.identity(), **payload})
        entry = self._cache.entry(key)
        if entry is None:
            return key, None
        if entry.unusable is not None:
            self.stats.cache_hits += 1
            self.stats.failures += 1
            raise LLMError(
                self._redact(
                    f"{op} (model '{self.model}'): unusable reply (cached): "
                    f"{' '.join(entry.unusable.split())}"
                )[:500]
            )
        hit = entry.value
        try:
            res = parse(hit)
            if validate is not None:
                validate(res)
        except (ValueError, KeyError, TypeError) as exc:  # a row older than a validator
            log.info("cached reply %s is unusable (%s); asking again", key[:12], exc)
            return key, None
        self.stats.cache_hits += 1
        return key, res

    def _unusable(self, validate: Callable[[R], None] | None, res: R) -> str | None:
        """Why `res` is unusable (its validator's ValueError), or None if it is fine."""
        if validate is None:
            return None
        try:
            validate(res)
        except ValueError as exc:
            return str(exc) or type(exc).__name__
        return None

    async def _fetch(
        self,
        op: str,
        call: Callable[[], Awaitable[R]],
        account: Callable[[R], None],
        validate: Callable[[R], None] | None,
        key: str | None,
    ) -> R:
        """One logical call: request, account, validate, retry an unusable reply within
        the shared budget, cache a usable reply. Every failure is one LLMError; when the
        budget runs out on a rejected reply, that reply is cached as unusable (a verdict
        only a fresh call reads: the retries here never consult the cache)."""
        self.stats.requests += 1
        budget = RetryBudget(max(0, int(self.max_retries)))
        token = _BUDGET.set(budget)
        try:
            while True:
                res = await call()  # transient errors are retried inside, same budget
                account(res)  # an unusable reply was still paid for
                why = self._unusable(validate, res)
                if why is None:
                    break
                if budget.left <= 0:
                    self._remember_unusable(key, res, why)
                    raise LLMError(
                        self._redact(
                            f"{op} (model '{self.model}'): unusable reply after "
                            f"{budget.used + 1} tries: {' '.join(why.split())}"
                        )[:500]
                    )
                budget.used += 1
                self.stats.retries += 1
                delay = backoff_s(budget.used, None)
                log.warning(
                    "%s",
                    self._redact(
                        f"{op} (model '{self.model}'): unusable reply ({' '.join(why.split())}"
                        f"); retry {budget.used}/{budget.total} in {delay:.1f}s"
                    )[:400],
                )
                await self.sleep(delay)
        except Exception:
            self.stats.failures += 1
            raise
        finally:
            _BUDGET.reset(token)
        if key is not None and self._cache is not None:
            self._cache.put(key, res.to_json())  # type: ignore[attr-defined]
        return res

    def _remember_unusable(self, key: str | None, res: Any, why: str) -> None:
        """Store the last rejected reply as this key's verdict (redacted: it is kept for
        diagnosis only, never returned). A cache that cannot take it only costs a repeat
        request on the next run, so it never fails the call."""
        if key is None or self._cache is None:
            return
        try:
            value = json.loads(self._redact(json.dumps(res.to_json(), ensure_ascii=False)))
            self._cache.put_unusable(key, value, self._redact(" ".join(why.split())))
        except Exception as exc:  # the call's own error is what matters
            log.warning("could not remember unusable reply %s: %s", key[:12], exc)

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
        validate: Callable[[ChatResult], None] | None = None,
    ) -> ChatResult:
        """One chat completion; a cached answer comes back with cached=True.

        `validate(result)` raising ValueError marks a reply unusable: it is not cached
        as an answer and the call is retried; when the retries are spent, LLMError
        ("unusable reply after N tries: <reason>") and the last reply is remembered as
        unusable, so the same call later raises LLMError("unusable reply (cached):
        <reason>") without a request. A cached usable reply it rejects is asked again.
        """
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
        key, hit = self._cached(
            payload, lambda d: ChatResult.from_json(d, cached=True), validate, "chat"
        )
        if hit is not None:
            return hit
        return await self._fetch(
            "chat",
            lambda: self._chat(msgs, int(max_tokens), float(temperature), int(top_logprobs)),
            lambda r: self._account(r.prompt_tokens, r.completion_tokens, r.cost_usd),
            validate,
            key,
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
        payload = {
            "op": "score",
            "prompt": prompt,
            "slot_offsets": slot_offsets,
            "candidates": list(candidates),
        }
        key, hit = self._cached(
            payload, lambda d: ScoreResult.from_json(d, cached=True), validate, "score_prompt"
        )
        if hit is not None:
            return hit
        return await self._fetch(
            "score_prompt",
            lambda: self._score(prompt, slot_offsets, list(candidates)),
            lambda r: self._account(r.prompt_tokens, 0, r.cost_usd),
            validate,
            key,
        )


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
