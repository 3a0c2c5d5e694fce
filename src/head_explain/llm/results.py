"""What LLM calls return and what determines them: the result records a backend gives
back (and the cache stores as JSON), the per-backend counters, and the request part of
every cache key (`chat_payload` / `score_payload`; plan.py builds the same to find
cache hits before a run)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    """One generated token, its log-probability and the top alternatives."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternative token -> logprob


class CacheRow:
    """A result as the response cache stores it: every field but `cached`, which says
    how this copy was obtained, not what the answer is."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses
        d.pop("cached")
        return d


@dataclass
class ChatResult(CacheRow):
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cost_usd: float
    cached: bool
    logprobs: list[TokenLogprob] | None
    raw: dict  # JSON-able response (never holds the API key)

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
class ScoreResult(CacheRow):
    """Per slot: candidate -> logprob (only candidates found); None if unreadable."""

    slots: list[dict[str, float] | None]
    prompt_tokens: int
    latency_s: float
    cost_usd: float
    cached: bool

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
    timeouts: int = 0  # requests that timed out (so do they, and they stretch the timeout)
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


@dataclass(frozen=True)
class ChatOptions:
    """How one chat attempt is made besides its messages: what every backend's `_chat`
    takes (one type, so the backends cannot drift apart in what they accept).
    `json_schema`: constrain the reply to it where the endpoint can (ignored where it
    cannot; the validator still runs). `stop_pattern`: a regex; the embedded model stops
    generating once its reply matches it (the reply keeps the matching token), where a
    longer reply would be cut there anyway: no change to what is used, less decoding.
    Remote endpoints ignore it."""

    max_tokens: int
    temperature: float
    top_logprobs: int
    seed: int | None = None
    json_schema: dict | None = None
    stop_pattern: str = ""


def chat_payload(
    messages: list[dict],
    max_tokens: int,
    temperature: float,
    top_logprobs: int,
    json_schema: dict | None = None,
    stop_pattern: str = "",
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
    if stop_pattern:  # likewise
        payload["stop_pattern"] = stop_pattern
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
