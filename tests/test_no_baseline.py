"""A head without a partner has no baseline: never scored with its own explanation."""

from __future__ import annotations

import asyncio
import math

import pandas as pd
import pytest

from head_explain import prompts, simulate
from head_explain.llm.cache import LLMCache
from head_explain.llm.embedded import EmbeddedBackend

pytestmark = pytest.mark.slow

TOKENS = ["def", " f", "(", "x", "):", " return", " x"]


def _events() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"split": split, "rank": 0, "excerpt_tokens": TOKENS,
             "excerpt_acts": [0.0, 1.0, 0.0, 3.0, 0.0, 2.0, 1.0]}
            for split in ("score_top", "score_random")
        ]
    )  # fmt: skip


def test_missing_partner_is_no_baseline_and_costs_nothing(tmp_path):
    backend = EmbeddedBackend(cache=LLMCache(tmp_path / "cache.sqlite"))
    template = prompts.load(simulate.ECHO_PROMPT)

    async def go(baseline: str, origin: str):
        try:
            return await simulate.score_head(
                backend,
                "echo",
                template,
                0,
                1,
                "the name of a variable",
                baseline,
                origin,
                _events(),
            )
        finally:
            if baseline:
                await backend.aclose()

    alone = asyncio.run(go("", ""))
    assert backend.stats.requests == 2  # the two excerpts, once each: no self-baseline
    assert math.isnan(alone["baseline_score"]) and alone["baseline_from"] == ""
    assert alone["baseline_error"].startswith("no baseline")
    assert not alone["error"] or "baseline" not in alone["error"]

    paired = asyncio.run(go("opening parentheses", "L3H2"))
    assert backend.stats.requests == 4  # the real ones are cached; the baseline is new
    assert paired["baseline_from"] == "L3H2" and paired["baseline_error"] is None
