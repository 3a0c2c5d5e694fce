"""Who spent what on which call: the statistics of one backend and one record per
logical call (cache hits and failures included), labelled with what the caller is
working on (`label_calls`), for traces, audits and the stage metrics."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeVar

from head_explain.llm.results import LLMStats

R = TypeVar("R")

# What the caller is working on (e.g. {"head": "L3H1"}), copied into each call record.
# A ContextVar so that concurrent heads, each in its own task, label their own calls.
_LABEL: ContextVar[dict[str, Any] | None] = ContextVar("head_explain_llm_label", default=None)

# The spend of the logical call this task serves, for its record (concurrency-safe).
_SPENT: ContextVar[list[float] | None] = ContextVar("head_explain_llm_spent", default=None)


def label_calls(**labels: Any) -> None:
    """Label every LLM call the current task makes from now on (see `LLMBackend.calls`)."""
    _LABEL.set({**(_LABEL.get() or {}), **labels})


class CallRecorder:
    """The statistics and call records of one backend (the base of `LLMBackend`)."""

    model: str = ""

    def __init__(self, model: str):
        self.model = model
        self.role = ""  # "explainer" | "simulator", set by make_backend
        self.stats = LLMStats()
        # One record per logical call (cache hits included), for traces and audits:
        # {head, role, model, op, prompt_tokens, completion_tokens, latency_s, cost_usd,
        #  cached, start_time, error}; the runner adds the stage and writes them.
        self.calls: list[dict[str, Any]] = []

    def _redact(self, text: str) -> str:
        """Text fit for logs and errors (backends holding a secret override this)."""
        return text

    def _account(self, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        spent = _SPENT.get()
        if spent is not None:
            spent[0] += cost
        self.stats.prompt_tokens += prompt_tokens
        self.stats.completion_tokens += completion_tokens
        self.stats.cost_usd += cost

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
