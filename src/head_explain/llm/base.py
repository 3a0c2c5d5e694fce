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

import asyncio
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import tenacity

from head_explain.errors import LLMError
from head_explain.llm.cache import LLMCache, cache_key
from head_explain.llm.policy import VARIED, AdaptiveLimit, Unusable, backoff_s, retry_policy

log = logging.getLogger(__name__)
__all__ = ["backoff_s"]  # re-exported: tests and backends import it from here

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
    retries: int = 0  # extra attempts (after a transient error or an unusable reply)
    unusable_retries: int = 0  # of those, retries of an unusable reply (varied request)
    throttled: int = 0  # 429 answers (each halves the concurrency, see policy.py)
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


# What the caller is working on (e.g. {"head": "L3H1"}), copied into each call record.
# A ContextVar so that concurrent heads, each in its own task, label their own calls.
_LABEL: ContextVar[dict[str, Any] | None] = ContextVar("head_explain_llm_label", default=None)

# The spend of the logical call this task serves, for its record (concurrency-safe).
_SPENT: ContextVar[list[float] | None] = ContextVar("head_explain_llm_spent", default=None)


def label_calls(**labels: Any) -> None:
    """Label every LLM call the current task makes from now on (see `LLMBackend.calls`)."""
    _LABEL.set({**(_LABEL.get() or {}), **labels})


def chat_payload(
    messages: list[dict],
    max_tokens: int,
    temperature: float,
    top_logprobs: int,
    json_schema: dict | None = None,
) -> dict[str, Any]:
    """What determines a chat answer besides the backend (its cache key's request part;
    plan.py builds the same to find cache hits before a run)."""
    payload: dict[str, Any] = {
        "op": "chat",
        "messages": [{"role": str(m["role"]), "content": str(m["content"])} for m in messages],
        "max_tokens": int(max_tokens),
        "temperature": float(temperature),
        "top_logprobs": int(top_logprobs),
    }
    if json_schema is not None:  # only then: keys of unconstrained calls stay as they were
        payload["json_schema"] = json_schema
    return payload


def score_payload(prompt: str, slot_offsets: list[int], candidates: list[str]) -> dict[str, Any]:
    """The request part of a score_prompt cache key (see chat_payload)."""
    return {
        "op": "score",
        "prompt": prompt,
        "slot_offsets": [int(o) for o in slot_offsets],
        "candidates": list(candidates),
    }


def check_slots(prompt: str, slot_offsets: list[int]) -> None:
    for off in slot_offsets:
        if not isinstance(off, int) or not 0 <= off <= len(prompt):
            raise ValueError(f"slot offset {off!r} is outside the prompt (0..{len(prompt)})")


class CostLimitReached(LLMError):
    """The next request would take the stage's spend past max_cost_usd: not sent."""


class LLMBackend(ABC):
    """Cache + stats around a backend's `_chat` / `_score`; subclasses only talk."""

    kind: str = ""
    model: str = ""
    # Retries of one call (transient errors and unusable replies together; an unusable
    # reply gets one of them, varied). 1 here: a local model has no transient errors.
    max_retries: int = 1

    def __init__(self, model: str, cache: LLMCache | None, concurrency: int = 4):
        self.model = model
        self.role = ""  # "explainer" | "simulator", set by make_backend
        self.stats = LLMStats()
        # One record per logical call (cache hits included), for traces and audits:
        # {head, role, model, op, prompt_tokens, completion_tokens, latency_s, cost_usd,
        #  cached, start_time, error}; the runner adds the stage and writes them.
        self.calls: list[dict[str, Any]] = []
        self._cache = cache
        self.max_cost_usd = 0.0  # 0: no limit; set by make_backend from the config
        self.cost_limited = False  # a request was refused for the limit
        self._reserved = 0.0  # estimated cost of the requests in flight
        self._concurrency = max(1, int(concurrency))
        self._limits: dict[int, AdaptiveLimit] = {}
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep  # tests record delays

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
    async def _chat(
        self,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        top_logprobs: int,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> ChatResult:
        """One attempt, no retries (`_fetch` retries). `json_schema`: constrain the reply
        to it where the endpoint can (ignored where it cannot; the validator still runs)."""

    @abstractmethod
    async def _score(
        self, prompt: str, slot_offsets: list[int], candidates: list[str]
    ) -> ScoreResult: ...

    async def aclose(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    # --- shared machinery ------------------------------------------------------------
    def limit(self) -> AdaptiveLimit:
        """The in-flight limit of this event loop (a backend may outlive one `asyncio.run`):
        hold it for one request, never across a retry's wait."""
        loop = asyncio.get_running_loop()
        lim = self._limits.get(id(loop))
        if lim is None:
            self._limits = {id(loop): AdaptiveLimit(self._concurrency)}
            lim = self._limits[id(loop)]
        return lim

    # --- what remote backends refine: which errors are worth another try ---------------
    def is_transient(self, exc: BaseException) -> bool:
        """Whether `exc` (raised by one `_chat`/`_score` attempt) may pass on a retry."""
        return False

    def is_throttle(self, exc: BaseException) -> bool:
        """Whether `exc` says "too many requests" (it lowers the concurrency)."""
        return False

    def retry_after(self, exc: BaseException) -> float | None:
        """Seconds the server asked us to wait before the next try, if it said."""
        return None

    def describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD of a request of that size (0 here: local models cost nothing)."""
        return 0.0

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
        call: Callable[[bool], Awaitable[R]],
        account: Callable[[R], None],
        validate: Callable[[R], None] | None,
        key: str | None,
        est_usd: float = 0.0,
    ) -> R:
        """One logical call under the retry policy (llm/policy.py): request, account,
        validate; `call(varied)` makes one attempt, `varied` after an unusable reply.
        Every failure is one LLMError; a reply still unusable after its one varied retry
        is cached as unusable (a verdict only a fresh call reads), a usable one is cached."""
        self.stats.requests += 1
        last_unusable: list[bool] = [False]

        def on_retry(state: tenacity.RetryCallState, delay: float) -> None:
            exc = state.outcome.exception() if state.outcome else None
            self.stats.retries += 1
            if isinstance(exc, Unusable):
                self.stats.unusable_retries += 1
                why = f"unusable reply ({' '.join(exc.why.split())}); retry with {VARIED}"
            else:
                why = self.describe(exc) if exc is not None else "?"
            log.warning(
                "%s",
                self._redact(
                    f"{op} (model '{self.model}'): {why}; retry {state.attempt_number}/"
                    f"{self.max_retries} in {delay:.1f}s"
                )[:400],
            )

        policy = retry_policy(
            max_retries=self.max_retries, transient=self.is_transient,
            retry_after=self.retry_after, on_retry=on_retry,
        )  # fmt: skip
        tries = 0
        try:
            async for attempt in tenacity.AsyncRetrying(sleep=self.sleep, **policy):
                with attempt:
                    tries = attempt.retry_state.attempt_number
                    res = await self._attempt(call, last_unusable[0], est_usd)
                    account(res)  # an unusable reply was still paid for
                    why = self._unusable(validate, res)
                    last_unusable[0] = why is not None
                    if why is not None:
                        raise Unusable(res, why)
        except Unusable as exc:
            self.stats.failures += 1
            self._remember_unusable(key, exc.reply, exc.why)
            raise LLMError(
                self._redact(
                    f"{op} (model '{self.model}'): unusable reply after {tries} tries: "
                    f"{' '.join(exc.why.split())}"
                )[:500]
            ) from None
        except LLMError:
            self.stats.failures += 1
            raise
        except Exception as exc:
            self.stats.failures += 1
            if isinstance(exc, CostLimitReached):
                raise
            tried = f" after {tries - 1} retries" if tries > 1 else ""
            raise LLMError(
                " ".join(self._redact(f"{self._what(op)} failed{tried}: {self.describe(exc)}")
                         .split())[:300]
            ) from None  # fmt: skip
        if key is not None and self._cache is not None:
            self._cache.put(key, res.to_json())  # type: ignore[attr-defined]
        return res

    async def _attempt(
        self, call: Callable[[bool], Awaitable[R]], varied: bool, est_usd: float = 0.0
    ) -> R:
        """One request holding one slot of the adaptive limit; a 429 lowers the limit.
        Refused, unsent, when it could take the spend past max_cost_usd (what is spent
        plus what the requests in flight may cost)."""
        lim = self.limit()
        async with lim:
            limit = self.max_cost_usd
            if limit > 0 and self.stats.cost_usd + self._reserved + est_usd > limit:
                self.cost_limited = True
                raise CostLimitReached(
                    f"max_cost_usd={limit:g} reached: ${self.stats.cost_usd:.4f} spent, the next "
                    f"request may cost ${est_usd:.4f}; not sent"
                )
            self._reserved += est_usd
            try:
                res = await call(varied)
            except Exception as exc:
                if self.is_throttle(exc):
                    self.stats.throttled += 1
                    lim.throttled()
                raise
            finally:
                self._reserved -= est_usd
            lim.succeeded()
            return res

    def _what(self, op: str) -> str:
        return f"{op} (model '{self.model}')"

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
        spent = _SPENT.get()
        if spent is not None:
            spent[0] += cost
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
        json_schema: dict | None = None,
    ) -> ChatResult:
        """One chat completion; a cached answer comes back with cached=True.

        `validate(result)` raising ValueError marks a reply unusable: it is not cached
        as an answer and the call is retried; when the retries are spent, LLMError
        ("unusable reply after N tries: <reason>") and the last reply is remembered as
        unusable, so the same call later raises LLMError("unusable reply (cached):
        <reason>") without a request. A cached usable reply it rejects is asked again.
        `json_schema` constrains the reply where the endpoint supports it.
        """
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        payload = chat_payload(messages, max_tokens, temperature, top_logprobs, json_schema)
        msgs = payload["messages"]

        async def run() -> ChatResult:
            key, hit = self._cached(
                payload, lambda d: ChatResult.from_json(d, cached=True), validate, "chat"
            )
            if hit is not None:
                return hit
            return await self._fetch(
                "chat",
                lambda varied: self._chat(
                    msgs,
                    int(max_tokens),
                    VARIED["temperature"] if varied else float(temperature),
                    int(top_logprobs),
                    VARIED["seed"] if varied else None,
                    json_schema,
                ),  # fmt: skip
                lambda r: self._account(r.prompt_tokens, r.completion_tokens, r.cost_usd),
                validate,
                key,
                # at most: chars/4 prompt tokens (+4 per message), max_tokens in reply
                self.price(sum(len(m["content"]) // 4 + 4 for m in msgs), int(max_tokens)),
            )

        return await self._recorded("chat", run)

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

        async def run() -> ScoreResult:
            key, hit = self._cached(
                payload, lambda d: ScoreResult.from_json(d, cached=True), validate, "score_prompt"
            )
            if hit is not None:
                return hit
            return await self._fetch(
                "score_prompt",
                lambda varied: self._score(prompt, slot_offsets, list(candidates)),
                lambda r: self._account(r.prompt_tokens, 0, r.cost_usd),
                validate,
                key,
                self.price(len(prompt) // 4 + 1, 1),
            )

        return await self._recorded("score", run)

    async def _recorded(self, op: str, run: Callable[[], Awaitable[R]]) -> R:
        """Run one logical call and append its record to `self.calls`, failed or not.
        cost_usd is what this call spent now (0 for a cache hit); tokens are the reply's."""
        start, t0 = time.time(), time.perf_counter()
        spent = [0.0]
        token = _SPENT.set(spent)
        rec: dict[str, Any] = {
            "head": (_LABEL.get() or {}).get("head"), "role": self.role, "model": self.model,
            "op": op, "prompt_tokens": 0, "completion_tokens": 0, "latency_s": 0.0,
            "cost_usd": 0.0, "cached": False, "start_time": round(start, 3), "error": None,
        }  # fmt: skip
        try:
            res = await run()
        except Exception as exc:
            rec["error"] = self._redact(f"{type(exc).__name__}: {exc}")[:300]
            raise
        else:
            rec["cached"] = bool(getattr(res, "cached", False))
            rec["prompt_tokens"] = int(getattr(res, "prompt_tokens", 0))
            rec["completion_tokens"] = int(getattr(res, "completion_tokens", 0))
            return res
        finally:
            _SPENT.reset(token)
            rec["cost_usd"] = round(spent[0], 8)  # retried unusable replies were paid too
            rec["latency_s"] = round(time.perf_counter() - t0, 4)
            self.calls.append(rec)


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
