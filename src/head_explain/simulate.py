"""Simulation scoring: how well does an explanation predict the head's activations?

The simulator reads an explanation and predicts every token's activation. Two methods:

- echo (Bills et al. 2023, "all at once"): one prompt with the excerpt one token per
  line, each followed by a value slot; the log-probs of the digits at every slot are
  read in a single scoring pass and their expected value is the prediction. Digits 0-9
  are used because they are single tokens in every tokenizer (so one pass is exact);
  the correlation score does not depend on the scale.
- chat: for chat-only endpoints; the model replies with a JSON object mapping each
  token's number to a value 0-10, constrained by a JSON schema (one required integer
  per token) where the endpoint supports it, so it cannot miscount; where top
  log-probs come back, each value is their expected value.

Score = Pearson correlation between simulated and true activations over all tokens of
all scoring excerpts pooled (OpenAI's ev_correlation_score); also on top-only and
random-only excerpts. The baseline scores each head with another head's explanation.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from head_explain.explain import show_token
from head_explain.prompts import PromptTemplate

ECHO_PROMPT = "simulate_echo_v1"
CHAT_PROMPT = "simulate_chat_v2"
ECHO_VALUES = [str(i) for i in range(10)]
PLACEHOLDER = "unknown"
NO_BASELINE = "no baseline: no other explained head to borrow an explanation from"


@dataclass
class Excerpt:
    split: str  # score_top | score_random
    tokens: list[str]
    true: np.ndarray
    rank: int = -1


def build_echo_prompt(
    template: PromptTemplate, explanation: str, tokens: list[str]
) -> tuple[str, list[int]]:
    """The all-at-once prompt and the character offset of every value slot."""
    head = template.render(explanation=explanation, lines="\x00")
    before, after = head.split("\x00")
    parts, slots, offset = [before], [], len(before)
    for tok in tokens:
        line = f"{show_token(tok)}\t"
        offset += len(line)
        slots.append(offset)
        parts.append(line + PLACEHOLDER + "\n")
        offset += len(PLACEHOLDER) + 1
    text = "".join(parts)
    text = text[:-1] + after  # the template already ends the last line
    return text, slots


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


def build_chat_messages(
    template: PromptTemplate, explanation: str, tokens: list[str]
) -> list[dict[str, str]]:
    numbered = "\n".join(f"{i}. {show_token(t)!r}" for i, t in enumerate(tokens, 1))
    return template.messages(explanation=explanation, numbered=numbered, n=len(tokens))


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


def correlation(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson r; NaN when either side is constant or fewer than 2 finite pairs remain."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    ok = np.isfinite(pred) & np.isfinite(true)
    if ok.sum() < 2:
        return math.nan
    p, t = pred[ok], true[ok]
    if np.std(p) == 0 or np.std(t) == 0:
        return math.nan
    return float(np.corrcoef(p, t)[0, 1])


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


async def simulate_excerpt(
    backend, method: str, template: PromptTemplate, explanation: str, tokens: list[str]
) -> np.ndarray:
    """Predicted activation per token (NaN where a slot could not be read)."""
    if method == "echo":
        # the instructions and few-shot example before the explanation are the same in
        # every prompt: an in-process backend computes them once
        await backend.share_prefix(template.text.split("$explanation")[0].rstrip())
        prompt, slots = build_echo_prompt(template, explanation, tokens)
        res = await backend.score_prompt(
            prompt, slots, ECHO_VALUES, validate=lambda r: check_echo_slots(r, len(slots))
        )
        return expected_values(res.slots, ECHO_VALUES)
    res = await backend.chat(
        build_chat_messages(template, explanation, tokens),
        max_tokens=8 * len(tokens) + 16,  # '"12": 10, ' is up to 8 tokens
        top_logprobs=5,
        validate=lambda r: chat_values(r, len(tokens)),
        json_schema=values_schema(len(tokens)),
    )
    return chat_values(res, len(tokens))


async def simulate_set(
    backend, method, template, explanation, excerpts: list[Excerpt]
) -> tuple[list[np.ndarray | None], list[str]]:
    """Simulate every excerpt; a failed excerpt is None plus a reason, not a crash."""

    async def one(ex: Excerpt):
        try:
            return await simulate_excerpt(backend, method, template, explanation, ex.tokens), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]

    results = await asyncio.gather(*(one(ex) for ex in excerpts))
    return [r[0] for r in results], [r[1] for r in results if r[1]]


def pooled_scores(excerpts: list[Excerpt], preds: list[np.ndarray | None]) -> dict[str, float]:
    out = {}
    for key, splits in (
        ("score", None),
        ("score_top", "score_top"),
        ("score_random", "score_random"),
    ):
        p, t = [], []
        for ex, pr in zip(excerpts, preds, strict=True):
            if pr is None or (splits and ex.split != splits):
                continue
            p.append(pr)
            t.append(ex.true)
        out[key] = correlation(np.concatenate(p), np.concatenate(t)) if p else math.nan
    return out


def head_excerpts(events: pd.DataFrame) -> list[Excerpt]:
    sc = events[events["split"].isin(["score_top", "score_random"])].sort_values(["split", "rank"])
    return [
        Excerpt(
            r.split, list(r.excerpt_tokens), np.asarray(r.excerpt_acts, dtype=float), int(r.rank)
        )
        for r in sc.itertuples(index=False)
    ]


def simulated_columns(excerpts: list[Excerpt], preds: list[np.ndarray | None]) -> dict:
    """sim_events ('split:rank' of each scoring event) and sim_acts (its simulated values,
    0-10, None for a failed excerpt): kept so the browser can show true vs simulated."""
    return {
        "sim_events": [f"{ex.split}:{ex.rank}" for ex in excerpts],
        "sim_acts": [None if p is None else np.round(p, 3).tolist() for p in preds],
    }


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation with no fixed point (for n >= 2): the baseline assignment."""
    if n < 2:
        return np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return perm


async def score_head(
    backend, method: str, template: PromptTemplate, layer: int, head: int, explanation: str,
    baseline_explanation: str, baseline_from: str, events: pd.DataFrame,
) -> dict[str, Any]:  # fmt: skip
    """One scores.parquet row: real score, split scores and the baseline score."""
    excerpts = head_excerpts(events)
    row: dict[str, Any] = dict(
        layer=layer, head=head, score=math.nan, score_top=math.nan, score_random=math.nan,
        baseline_score=math.nan, baseline_from=baseline_from, method=method,
        simulator_model=backend.model, n_tokens=int(sum(len(e.tokens) for e in excerpts)),
        n_failed=0, error=None, baseline_error=None, sim_events=[], sim_acts=[],
    )  # fmt: skip
    if not explanation:
        row["error"] = "no explanation to score"
        return row
    if not excerpts:
        row["error"] = "no scoring excerpts"
        return row
    if not baseline_explanation:  # scoring the head's own text again is no baseline
        row["baseline_from"] = ""
        row["baseline_error"] = NO_BASELINE
        preds, errs = await simulate_set(backend, method, template, explanation, excerpts)
        base_errs: list[str] = []
    else:
        (preds, errs), (base_preds, base_errs) = await asyncio.gather(
            simulate_set(backend, method, template, explanation, excerpts),
            simulate_set(backend, method, template, baseline_explanation, excerpts),
        )
        row["baseline_score"] = pooled_scores(excerpts, base_preds)["score"]
    row.update(pooled_scores(excerpts, preds))
    row.update(simulated_columns(excerpts, preds))
    failed_slots = sum(int(np.isnan(p).sum()) for p in preds if p is not None)
    row["n_failed"] = sum(p is None or bool(np.isnan(p).any()) for p in preds)  # excerpts
    if errs:
        row["error"] = f"{len(errs)}/{len(excerpts)} excerpts failed; first: {errs[0]}"
    elif failed_slots:
        row["error"] = f"{failed_slots} of {row['n_tokens']} token slots unreadable"
    if math.isnan(row["score"]) and not row["error"]:
        row["error"] = "simulation or activations constant: correlation undefined"
    if base_errs:  # the baseline can fail on its own; say so rather than a bare NaN
        note = f"baseline: {len(base_errs)}/{len(excerpts)} excerpts failed; first: {base_errs[0]}"
        row["error"] = f"{row['error']}; {note}" if row["error"] else note
    return row


def baseline_assignment(
    heads: list[tuple[int, int]], seed: int
) -> dict[tuple[int, int], tuple[int, int]]:
    """Each head -> the head whose explanation it is scored with as the baseline."""
    perm = derangement(len(heads), np.random.default_rng([seed, 99]))
    return {heads[i]: heads[int(j)] for i, j in enumerate(perm)}
