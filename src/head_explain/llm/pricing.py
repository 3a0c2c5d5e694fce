"""Per-model token prices, so every run can report what its LLM calls cost.

Prices are USD per 1M tokens (OpenAI's list prices, standard tier). Dated snapshots
(`gpt-4o-mini-2024-07-18`) cost what their alias costs. Unknown models and local
servers cost 0; an unknown OpenAI model is logged once so that a zero in the report
is never mistaken for a free run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Price:
    input_per_m: float  # USD per 1M prompt tokens
    output_per_m: float  # USD per 1M completion tokens


PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-3.5-turbo-instruct": Price(1.50, 2.00),
}

_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_warned: set[str] = set()


def price(model: str) -> Price | None:
    """The price of `model`, matching dated snapshots to their alias; None if unknown."""
    name = model.strip().lower()
    if name in PRICES:
        return PRICES[name]
    return PRICES.get(_DATE_SUFFIX.sub("", name))


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, *, local: bool) -> float:
    """USD cost of one request; 0 for local servers and (logged once) unknown models."""
    if local:
        return 0.0
    p = price(model)
    if p is None:
        if model not in _warned:
            _warned.add(model)
            log.warning("no price known for model '%s'; its cost is reported as 0", model)
        return 0.0
    return (prompt_tokens * p.input_per_m + completion_tokens * p.output_per_m) / 1e6
