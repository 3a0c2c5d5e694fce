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
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from head_explain.explain import show_token
from head_explain.prompts import PromptTemplate
from head_explain.simulation_replies import (
    chat_values,
    check_echo_slots,
    expected_values,
    values_schema,
)

ECHO_PROMPT = "simulate_echo_v1"
CHAT_PROMPT = "simulate_chat_v2"
ECHO_VALUES = [str(i) for i in range(10)]
PLACEHOLDER = "unknown"
SEQUENCE_BREAK = "<end>\n<start>\n"  # between excerpts batched into one echo prompt
NO_BASELINE = "no baseline: no other explained head to borrow an explanation from"


@dataclass
class Excerpt:
    split: str  # score_top | score_random
    tokens: list[str]
    true: np.ndarray
    rank: int = -1


def build_echo_prompt(
    template: PromptTemplate, explanation: str, tokens: list[str], *more: list[str]
) -> tuple[str, list[int]]:
    """The all-at-once prompt and the character offset of every value slot. Further
    excerpts (`more`) follow as sequences of their own, each closed by <end> and opened
    by <start>, their slots after the first excerpt's (one request for several)."""
    head = template.render(explanation=explanation, lines="\x00")
    before, after = head.split("\x00")
    parts, slots, offset = [before], [], len(before)
    for i, seq in enumerate((tokens, *more)):
        if i:  # close the previous sequence (its last newline is already written)
            parts.append(SEQUENCE_BREAK)
            offset += len(SEQUENCE_BREAK)
        for tok in seq:
            line = f"{show_token(tok)}\t"
            offset += len(line)
            slots.append(offset)
            parts.append(line + PLACEHOLDER + "\n")
            offset += len(PLACEHOLDER) + 1
    text = "".join(parts)
    text = text[:-1] + after  # the template already ends the last line
    return text, slots


def build_chat_messages(
    template: PromptTemplate, explanation: str, tokens: list[str], *more: list[str]
) -> list[dict[str, str]]:
    """The chat prompt; further excerpts (`more`) follow after a blank line, their
    tokens numbered on from the first's (one request for several)."""
    blocks, n = [], 0
    for seq in (tokens, *more):
        blocks.append("\n".join(f"{n + i}. {show_token(t)!r}" for i, t in enumerate(seq, 1)))
        n += len(seq)
    return template.messages(explanation=explanation, numbered="\n\n".join(blocks), n=n)


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


async def simulate_excerpt(
    backend, method: str, template: PromptTemplate, explanation: str, tokens: list[str]
) -> np.ndarray:
    """Predicted activation per token (NaN where a slot could not be read)."""
    return (await simulate_batch(backend, method, template, explanation, [tokens]))[0]


def simulation_request(
    template: PromptTemplate, method: str, explanation: str, batch: list[list[str]]
) -> dict[str, Any]:
    """What one simulation request sends (the stage and `--plan` build the same): echo
    {prompt, slots} or chat {messages, max_tokens, json_schema}."""
    if method == "echo":
        prompt, slots = build_echo_prompt(template, explanation, *batch)
        return {"prompt": prompt, "slots": slots}
    n = sum(len(t) for t in batch)
    return {
        "messages": build_chat_messages(template, explanation, *batch),
        "max_tokens": 8 * n + 16,  # '"12": 10, ' is up to 8 tokens
        "json_schema": values_schema(n),
    }


async def simulate_batch(
    backend, method: str, template: PromptTemplate, explanation: str, batch: list[list[str]]
) -> list[np.ndarray]:
    """Predicted activations of several excerpts simulated in one request, one array per
    excerpt (NaN where a slot could not be read)."""
    n = sum(len(t) for t in batch)
    req = simulation_request(template, method, explanation, batch)
    if method == "echo":
        # the instructions and few-shot example before the explanation are the same in
        # every prompt: an in-process backend computes them once
        await backend.share_prefix(template.text.split("$explanation")[0].rstrip())
        res = await backend.score_prompt(
            req["prompt"], req["slots"], ECHO_VALUES, validate=lambda r: check_echo_slots(r, n)
        )
        values = expected_values(res.slots, ECHO_VALUES)
    else:
        res = await backend.chat(
            req["messages"], max_tokens=req["max_tokens"], top_logprobs=5,
            validate=lambda r: chat_values(r, n), json_schema=req["json_schema"],
        )  # fmt: skip
        values = chat_values(res, n)
    return np.split(values, np.cumsum([len(t) for t in batch])[:-1])


def request_batches(excerpts: list[Excerpt], per_request: int) -> list[list[int]]:
    """Indices of the excerpts sent together: `per_request` at a time, in order."""
    idx = list(range(len(excerpts)))
    return [idx[i : i + per_request] for i in range(0, len(idx), max(1, per_request))]


async def simulate_set(
    backend, method, template, explanation, excerpts: list[Excerpt], per_request: int = 1
) -> tuple[list[np.ndarray | None], list[str]]:
    """Simulate every excerpt, `per_request` of them per request; a failed request is
    None for each of its excerpts plus a reason per excerpt (counted, not a crash)."""
    preds: list[np.ndarray | None] = [None] * len(excerpts)
    errors: list[str] = []

    async def one(batch: list[int]) -> None:
        try:
            got = await simulate_batch(
                backend, method, template, explanation, [excerpts[i].tokens for i in batch]
            )
        except Exception as exc:
            errors.extend([f"{type(exc).__name__}: {exc}"[:300]] * len(batch))
            return
        for i, values in zip(batch, got, strict=True):
            preds[i] = values

    await asyncio.gather(*(one(b) for b in request_batches(excerpts, per_request)))
    return preds, errors


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
    baseline_explanation: str, baseline_from: str, events: pd.DataFrame, per_request: int = 1,
) -> dict[str, Any]:  # fmt: skip
    """One scores.parquet row: real score, split scores and the baseline score."""
    excerpts = head_excerpts(events)
    row: dict[str, Any] = dict(
        layer=layer, head=head, score=math.nan, score_top=math.nan, score_random=math.nan,
        baseline_score=math.nan, baseline_from=baseline_from, method=method,
        simulator_model=backend.model, n_tokens=int(sum(len(e.tokens) for e in excerpts)),
        n_failed=0, error=None, baseline_error=None, sim_events=[], sim_acts=[],
        excerpts_per_request=per_request,
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
        preds, errs = await simulate_set(
            backend, method, template, explanation, excerpts, per_request
        )
        base_errs: list[str] = []
    else:
        (preds, errs), (base_preds, base_errs) = await asyncio.gather(
            simulate_set(backend, method, template, explanation, excerpts, per_request),
            simulate_set(backend, method, template, baseline_explanation, excerpts, per_request),
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
