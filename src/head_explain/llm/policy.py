"""How LLM calls are retried and how many run at once: one policy for every request.

Retries (tenacity): one loop per logical call, in `LLMBackend._fetch`, covers transport
faults (429, 5xx, timeouts, resets, malformed bodies: the backend says which are
transient) and unusable replies together, so a call costs at most `max_retries + 1`
requests whatever mix of faults it meets. The wait is full-jitter exponential backoff,
never shorter than the server's Retry-After. An unusable reply is retried at most
once (`UNUSABLE_RETRIES`), and that retry asks with a changed temperature and seed
(`VARIED`): at temperature 0 the same request gives the same reply, so asking again
unchanged pays for a known answer. The echo probe (sync) uses the same policy.

Concurrency (`AdaptiveLimit`): AIMD, as TCP does. Up to `llm_concurrency` requests are
in flight; a 429 or a timed-out request halves the limit (at most once per cool-down,
since one overload answers many requests at once); every success adds 1/limit, so the
limit grows by one per round of successes back to `llm_concurrency`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import tenacity

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_AFTER_CAP_S = 120.0
UNUSABLE_RETRIES = 1
# The one retry of an unusable reply: what changes in the request (seed where the
# endpoint takes one; temperature everywhere) so that it can come back different.
VARIED = {"temperature": 0.7, "seed": 1}
CUT_COOLDOWN_S = 1.0


class Unusable(Exception):
    """A reply the caller's validator rejected (carries the reply and the reason)."""

    def __init__(self, reply: Any, why: str):
        super().__init__(why)
        self.reply = reply
        self.why = why


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


def retry_policy(
    *,
    max_retries: int,
    transient: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException], float | None],
    on_retry: Callable[[tenacity.RetryCallState, float], None],
) -> dict[str, Any]:
    """Keyword arguments for tenacity.Retrying / AsyncRetrying: retry transient faults
    and (once) unusable replies, at most `max_retries` times in all; the last error is
    re-raised as it was. `on_retry(state, delay)` counts and logs each retry."""
    unusable_seen: list[int] = []

    def should_retry(state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return False
        if isinstance(exc, Unusable):
            unusable_seen.append(1)
            return len(unusable_seen) <= UNUSABLE_RETRIES
        return transient(exc)

    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = None if exc is None or isinstance(exc, Unusable) else retry_after(exc)
        return backoff_s(state.attempt_number, after)

    def before_sleep(state: tenacity.RetryCallState) -> None:  # only when it will retry
        on_retry(state, state.next_action.sleep if state.next_action else 0.0)

    return dict(
        stop=tenacity.stop_after_attempt(max(0, int(max_retries)) + 1),
        retry=should_retry,
        wait=wait,
        before_sleep=before_sleep,
        reraise=True,
    )


class AdaptiveLimit:
    """At most `limit` holders at once; `throttled()` halves it, `succeeded()` regrows it."""

    def __init__(self, most: int):
        self.most = max(1, int(most))
        self.limit = float(self.most)
        self.active = 0
        self.lowest = self.most  # for the stage metrics: how far 429s pushed it down
        self._cond = asyncio.Condition()
        self._last_cut = -1e9

    async def __aenter__(self) -> AdaptiveLimit:
        async with self._cond:
            await self._cond.wait_for(lambda: self.active < max(1, int(self.limit)))
            self.active += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        async with self._cond:
            self.active -= 1
            self._cond.notify_all()

    def throttled(self, why: str = "throttles (429)") -> None:
        now = time.monotonic()
        if now - self._last_cut < CUT_COOLDOWN_S:
            return
        self._last_cut = now
        self.limit = max(1.0, self.limit / 2)
        self.lowest = min(self.lowest, int(self.limit))
        log.info("LLM endpoint %s: concurrency now %d", why, int(self.limit))

    def succeeded(self) -> None:
        """Call while holding a slot: the release that follows wakes the waiters."""
        if self.limit < self.most:
            self.limit = min(float(self.most), self.limit + 1.0 / self.limit)
