"""Reading a simulator's replies: expected values from digit log-probs (echo), the
JSON object of a chat reply (with its schema), and the checks that make a malformed
reply a retried error rather than a silent zero."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np


def expected_values(slots: list[dict[str, float] | None], values: list[str]) -> np.ndarray:
    """Expected value per slot over the candidates present (renormalised); NaN if none."""
    out = np.full(len(slots), np.nan)
    for i, dist in enumerate(slots):
        if not dist:
            continue
        keys = [v for v in values if v in dist]
        if not keys:
            continue
        lp = np.array([dist[k] for k in keys])
        p = np.exp(lp - lp.max())
        out[i] = float((p * np.array([float(k) for k in keys])).sum() / p.sum())
    return out


def values_schema(n: int) -> dict[str, Any]:
    """JSON schema of a chat simulation reply: {"1": v1, ..., "n": vn}, every vi a
    required integer 0-10 (an enum: the form every constrained decoder supports)."""
    value = {"type": "integer", "enum": list(range(11))}
    keys = [str(i) for i in range(1, n + 1)]
    return {
        "type": "object",
        "properties": {k: value for k in keys},
        "required": keys,
        "additionalProperties": False,
    }


_OBJECT_VALUE = re.compile(r'"\s*(\d+)\s*"\s*:\s*(-?\d+(?:\.\d+)?)')


def chat_value_spans(text: str, n: int) -> list[tuple[int, float]]:
    """(character offset, value) of each of the `n` values in a reply: a JSON object
    {"1": v, ..., "n": v} (keys in any order) or, from free text, a JSON array.
    ValueError when the reply has not exactly `n` numbers in 0-10."""
    start = text.find("{")
    if start >= 0:
        end = text.find("}", start)
        body = text[start : end + 1 if end >= 0 else len(text)]
        found = {int(m.group(1)): (start + m.start(2), float(m.group(2)))
                 for m in _OBJECT_VALUE.finditer(body)}  # fmt: skip
        if not found:
            raise ValueError("reply's object has no numbered values")
        if sorted(found) != list(range(1, n + 1)):
            raise ValueError(f"reply has values for {len(found)} token numbers, not 1..{n}")
        spans = [found[i] for i in range(1, n + 1)]
    else:
        match = re.search(r"\[[^\[\]]*\]", text, flags=re.S)
        if not match:
            raise ValueError("reply has no JSON object or array")
        try:
            values = json.loads(match.group(0))
        except json.JSONDecodeError:
            raise ValueError("reply's array is not valid JSON") from None
        if len(values) != n:
            raise ValueError(f"reply has {len(values)} values for {n} tokens")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise ValueError("reply has values that are not numbers in 0-10")
        nums = list(re.finditer(r"-?\d+(?:\.\d+)?", match.group(0)))
        spans = [(match.start() + m.start(), float(v)) for m, v in zip(nums, values, strict=False)]
    arr = np.array([v for _, v in spans])
    if np.isnan(arr).any() or (arr < 0).any() or (arr > 10).any():
        raise ValueError("reply has values that are not numbers in 0-10")
    return spans


def parse_chat_values(text: str, n: int) -> np.ndarray:
    """The `n` values 0-10 of a reply (see chat_value_spans); ValueError otherwise."""
    return np.array([v for _, v in chat_value_spans(text, n)])


def chat_expected_values(logprobs, n: int, text: str = "") -> np.ndarray | None:
    """Expected values from the top log-probs of the tokens that start each value in
    the reply (found by character offset, so digits in keys are never mistaken for
    values); None where the tokens do not spell the text or a value has no top list."""
    if not logprobs:
        return None
    if not text:
        text = "".join(lp.token for lp in logprobs)
    if "".join(lp.token for lp in logprobs) != text:
        return None
    try:
        spans = chat_value_spans(text, n)
    except ValueError:
        return None
    starts: dict[int, Any] = {}
    pos = 0
    for lp in logprobs:  # a value's token may carry leading whitespace (" 5")
        body = lp.token.lstrip()
        starts[pos + len(lp.token) - len(body)] = lp
        pos += len(lp.token)
    chosen = [starts.get(off) for off, _ in spans]
    if any(c is None for c in chosen):
        return None
    values = [str(i) for i in range(11)]
    out = expected_values([{k.strip(): v for k, v in c.top.items()} for c in chosen], values)
    return None if np.isnan(out).any() else out


def chat_values(res, n: int) -> np.ndarray:
    """A chat reply's `n` values (log-prob expectation, else the JSON array); ValueError
    when it has neither (wrong shape, count or range): the backend then retries."""
    values = parse_chat_values(res.text, n)  # the reply itself must be well formed
    ev = chat_expected_values(res.logprobs, n, res.text)
    return ev if ev is not None else values


def check_echo_slots(res, n: int) -> None:
    """ValueError unless an echo reply has `n` slots, at least one readable, and every
    log-probability a number <= 0 (an all-unreadable reply would score as nothing)."""
    if len(res.slots) != n:
        raise ValueError(f"reply has {len(res.slots)} slots for {n} tokens")
    if all(not s for s in res.slots):
        raise ValueError(f"none of the {n} value slots could be read")
    for s in res.slots:
        for v in (s or {}).values():
            if not isinstance(v, int | float) or math.isnan(v) or v > 1e-6:
                raise ValueError(f"slot log-probability {v!r} is out of range")
