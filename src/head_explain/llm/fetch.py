"""How one logical LLM call is served: from the response cache, else by requests
under the one retry policy (llm/policy.py), the adaptive concurrency limit and the
stage's spend limit; a usable reply is cached, one still unusable after its varied
retry is remembered as unusable (see llm/base.py for the contract callers see)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tenacity

from head_explain.errors import LLMError
from head_explain.llm.cache import LLMCache, cache_key
from head_explain.llm.policy import VARIED, AdaptiveLimit, Unusable, retry_policy
from head_explain.llm.records import CallRecorder

log = logging.getLogger(__name__)

R = TypeVar("R")


class CostLimitReached(LLMError):
    """The next request would take the stage's spend past max_cost_usd: not sent."""


class CachedFetcher(CallRecorder):
    """Cache + retries + limits around a backend's requests (the base of `LLMBackend`)."""

    # Retries of one call (transient errors and unusable replies together; an unusable
    # reply gets one of them, varied). 1 here: a local model has no transient errors.
    max_retries: int = 1

    def __init__(self, model: str, cache: LLMCache | None, concurrency: int = 4):
        super().__init__(model)
        self._cache = cache
        self.max_cost_usd = 0.0  # 0: no limit; set by make_backend from the config
        self.cost_limited = False  # a request was refused for the limit
        self._reserved = 0.0  # estimated cost of the requests in flight
        self._concurrency = max(1, int(concurrency))
        self._limits: dict[int, AdaptiveLimit] = {}
        self.sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep  # tests record delays

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

    def is_timeout(self, exc: BaseException) -> bool:
        """Whether `exc` is a request that timed out: the endpoint is busy, so it lowers
        the concurrency too (a remote backend also waits longer next time)."""
        return False

    def retry_after(self, exc: BaseException) -> float | None:
        """Seconds the server asked us to wait before the next try, if it said."""
        return None

    def describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD of a request of that size (0 here: local models cost nothing)."""
        return 0.0

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
                elif self.is_timeout(exc):
                    self.stats.timeouts += 1
                    lim.throttled("does not answer in time")
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

    async def _call(
        self,
        op: str,
        payload: dict[str, Any],
        from_json: Callable[[dict[str, Any], bool], R],
        validate: Callable[[R], None] | None,
        call: Callable[[bool], Awaitable[R]],
        account: Callable[[R], None],
        est_usd: float,
    ) -> R:
        """One logical call (`chat` or `score_prompt`): the cached reply if there is a
        usable one, else `_fetch` with `call` and the estimated cost `est_usd`."""
        key, hit = self._cached(payload, lambda d: from_json(d, True), validate, op)
        if hit is not None:
            return hit
        return await self._fetch(op, call, account, validate, key, est_usd)
