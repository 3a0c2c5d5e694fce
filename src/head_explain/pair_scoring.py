"""Pair scoring (OpenAI transformer-debugger): does an explanation say which token pairs
a head attends across?

- Positives: each held-out top event's (destination, main source) pair, the source
  with the largest attention write attn[t,s] * ||v[s] W_O|| (score_top excerpts).
- Easy negatives: random (destination, earlier source) pairs from random windows whose
  write is below EASY_FRACTION x the head's largest pair write.
- Hard negatives: pairs that fit the head's template (`pair_template`, e.g. the previous
  token for a previous_token head) but where the head writes as little.

The cache stage records, for every token of the random windows, the write of its
template pairs and of one random earlier source, and select marks the pairs of each
scoring excerpt (both in pair_candidates.py); simulate asks the simulator about every
marked pair of an excerpt in one request and scores ROC-AUC against each negative set.
Prompt pairs_v2 words each pair by its relation ("the previous token", "an earlier copy
of the current token", ...), pairs_v1 by its offset only.
Baselines: another head's explanation (shuffled) and the template predictor (1 iff the
pair fits `pair_template`; induction also takes fuzzy matches, `continues_here`), with
its one-sentence wording.
What the explainer added: where the explanation starts with the measured clause (the
embedded model completes it), the clause alone is judged too (`clause_auc_*`), and
`added_* = pair_auc - clause_auc` is what the model's part changed.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pandas as pd

from head_explain.evidence import TEMPLATE_WORDS, word_key
from head_explain.explain import show_token
from head_explain.simulation_replies import values_schema

YES, NO = " yes", " no"
YES_NO = [YES, NO]
AUC_COLUMNS = [
    f"{k}_auc_{n}" for k in ("pair", "template", "shuffled", "clause") for n in ("easy", "hard")
] + ["lift_easy", "lift_hard", "added_easy", "added_hard"]
TEMPLATE_SENTENCES = {
    "previous_token": "attends from each token to the previous token.",
    "self": "attends from each token to the token itself.",
    "duplicate_token": "attends from a token to an earlier copy of the same token.",
    "induction": "attends from a token to the token that followed an earlier copy of it, "
    "or to an earlier copy of the token that comes next.",
}


# ------------------------------------------------------------------ simulate side
def template_predicts(template: str, tokens: list[str], dest: int, src: int) -> float:
    """The template's deterministic verdict on one pair: 1.0 if the pair fits, else 0.
    Copies are copies of a word (`evidence.word_key`: case and surrounding space aside)."""
    if template == "previous_token":
        return float(src == dest - 1)
    if template == "self":
        return float(src == dest)
    if template == "duplicate_token":
        return float(src < dest and word_key(tokens[src]) == word_key(tokens[dest]))
    if template == "induction":
        return float(follows_copy(tokens, dest, src) or continues_here(tokens, dest, src))
    return 0.0


def follows_copy(tokens: list[str], dest: int, src: int) -> bool:
    """Strict induction (Olsson et al.): the source followed an earlier copy of dest."""
    return 1 <= src < dest and word_key(tokens[src - 1]) == word_key(tokens[dest])


def continues_here(tokens: list[str], dest: int, src: int) -> bool:
    """Fuzzy induction: the source is an earlier copy of the token that comes next.

    On natural text an induction head often matches the context before dest loosely
    (at "eval" it reads the "()" after an earlier "exec") and reads where that context
    went on; what it reads is then the next token here. With this, the template's easy
    pair-AUC on the bundled model's 9 induction heads is 0.911, against 0.876 for the
    strict rule alone, on the demo's windows; +0.028 on two window samples it was not
    chosen on (`benchmarks/bench_quality.py --seed N`, template check)."""
    return src < dest < len(tokens) - 1 and word_key(tokens[src]) == word_key(tokens[dest + 1])


def pair_relation(tokens: list[str], dest: int, src: int) -> str:
    """The pair's relation in the words explanations use (pairs_v2): offset, copy, after
    a copy. Shuffled and real explanations are judged on the same wording, so it helps a
    small simulator match words without favouring either."""
    back = dest - src
    rel = [{0: TEMPLATE_WORDS["self"], 1: TEMPLATE_WORDS["previous_token"]}.get(back)
           or f"{back} tokens back"]  # fmt: skip
    if template_predicts("duplicate_token", tokens, dest, src):  # the templates' own tests
        rel.append(TEMPLATE_WORDS["duplicate_token"])
    if follows_copy(tokens, dest, src):  # the words say "followed", not "comes next"
        rel.append(TEMPLATE_WORDS["induction"])
    return "; ".join(rel)


def pair_line(tokens: list[str], dest: int, src: int, relations: bool = False) -> str:
    back = dest - src
    if relations:
        where = pair_relation(tokens, dest, src)
    else:
        where = "the same token" if back == 0 else f"{back} token{'s' * (back != 1)} back"
    d = show_token(tokens[dest]).strip() or show_token(tokens[dest])
    s = show_token(tokens[src]).strip() or show_token(tokens[src])
    return f'from "{d}" to "{s}" ({where}):'


def build_pair_echo(
    template, explanation: str, tokens: list[str], pairs, relations: bool = False
) -> tuple[str, list]:
    """One prompt for all pairs of an excerpt; a yes/no slot after each pair line."""
    text = "".join(show_token(t) for t in tokens).strip()
    head = template.render(explanation=explanation, text=text, pairs="\x00")
    before, after = head.split("\x00")
    parts, slots, offset = [before], [], len(before)
    for d, s in pairs:
        line = pair_line(tokens, d, s, relations)
        offset += len(line)
        slots.append(offset)
        parts.append(line + " ?\n")
        offset += 3
    return "".join(parts)[:-1] + after, slots


def yes_probability(slot: dict[str, float] | None) -> float:
    """P(yes) from a slot's log-probs of " yes" / " no" (NaN if neither was read)."""
    if not slot:
        return math.nan
    y, n = slot.get(YES), slot.get(NO)
    if y is not None and n is not None:
        return float(1 / (1 + math.exp(n - y)))
    if y is not None:
        return float(math.exp(y))
    return float(1 - math.exp(n)) if n is not None else math.nan


def pair_request(templates, method: str, explanation: str, tokens, pairs) -> dict[str, Any]:
    """What one pair-judging request sends (the stage and `--plan` build the same): echo
    {prompt, slots} or chat {messages, max_tokens, json_schema}."""
    rel = templates.get("relations", False)
    if method == "echo":
        prompt, slots = build_pair_echo(templates["echo"], explanation, tokens, pairs, rel)
        return {"prompt": prompt, "slots": slots}
    lines = "\n".join(
        f"{i}. {pair_line(tokens, d, s, rel)[:-1]}" for i, (d, s) in enumerate(pairs, 1)
    )
    text = "".join(show_token(t) for t in tokens).strip()
    msgs = templates["chat"].messages(explanation=explanation, text=text, pairs=lines, n=len(pairs))
    # the same reply form as chat simulation, {"1": v, ..., "n": v}: a schema every
    # constrained decoder takes (an array root is refused by OpenAI's structured outputs)
    return {"messages": msgs, "max_tokens": 8 * len(pairs) + 16,
            "json_schema": values_schema(len(pairs))}  # fmt: skip


async def judge_excerpt(backend, method: str, templates, explanation: str, tokens, pairs):
    """P(head attends across the pair) for every pair of one excerpt, one request."""
    from head_explain.simulation_replies import parse_chat_values

    req = pair_request(templates, method, explanation, tokens, pairs)
    if method == "echo":
        # instructions and few-shot examples are the same in every pair prompt: an
        # in-process backend computes them once
        await backend.share_prefix(templates["echo"].text.split("$explanation")[0].rstrip())
        slots = req["slots"]

        def check(res):
            if len(res.slots) != len(slots) or all(not s for s in res.slots):
                raise ValueError("no yes/no slot could be read")

        res = await backend.score_prompt(req["prompt"], slots, YES_NO, validate=check)
        return np.array([yes_probability(s) for s in res.slots])
    res = await backend.chat(
        req["messages"], max_tokens=req["max_tokens"], json_schema=req["json_schema"],
        validate=lambda r: parse_chat_values(r.text, len(pairs)),
    )  # fmt: skip
    return parse_chat_values(res.text, len(pairs)) / 10.0


def load_templates(pair_prompt: str) -> dict[str, Any]:
    """The echo and chat templates of a pair prompt version, and its pair wording."""
    from head_explain import prompts

    version = pair_prompt.removeprefix("pairs_")
    return {"echo": prompts.load(f"pairs_echo_{version}"),
            "chat": prompts.load(f"pairs_chat_{version}"), "relations": version != "v1"}  # fmt: skip


def auc(pos: np.ndarray, neg: np.ndarray) -> tuple[float, str | None]:
    """ROC-AUC of positives over negatives; NaN and why when it cannot be computed."""
    from sklearn.metrics import roc_auc_score

    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    if not len(pos):
        return math.nan, "no judged positive pairs"
    if not len(neg):
        return math.nan, "no judged negative pairs"
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg])), None


def pair_table(events: pd.DataFrame) -> list[tuple[list[str], list[tuple[int, int]], list[str]]]:
    """(tokens, pairs, labels) of every scoring excerpt of one head that marks pairs."""
    if "pair_label" not in events.columns:  # events made before pair marking existed
        return []
    sc = events[events["split"].isin(["score_top", "score_random"])].sort_values(["split", "rank"])
    out = []
    for r in sc.itertuples(index=False):
        if len(r.pair_label):
            pairs = list(zip(map(int, r.pair_dest), map(int, r.pair_src), strict=True))
            out.append((list(r.excerpt_tokens), pairs, list(r.pair_label)))
    return out


async def score_pairs(
    backend, method: str, templates, explanation: str, shuffled: str, template: str,
    events: pd.DataFrame, clause: str = "",
) -> dict[str, Any]:  # fmt: skip
    """scores.parquet's pair columns for one head (explanation, shuffled, template, and
    `clause`, the measured clause alone as a sentence, when the explanation extends it)."""
    table = pair_table(events)
    labels = np.array([lab for _, _, labs in table for lab in labs])
    row: dict[str, Any] = {"pair_template": template,
                           "template_sentence": TEMPLATE_SENTENCES.get(template, ""),
                           "n_pairs_pos": int((labels == "pos").sum()),
                           "n_pairs_easy": int((labels == "easy").sum()),
                           "n_pairs_hard": int((labels == "hard").sum()), "pair_error": None}  # fmt: skip
    tmpl = np.array(
        [template_predicts(template, t, d, s) for t, pairs, _ in table for d, s in pairs]
    )
    errors: list[str] = []

    async def judged(expl: str) -> np.ndarray:
        async def one(tokens, pairs):
            try:
                return await judge_excerpt(backend, method, templates, expl, tokens, pairs)
            except Exception as exc:  # a failed excerpt is NaNs plus a reason
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return np.full(len(pairs), np.nan)

        parts = await asyncio.gather(*(one(t, p) for t, p, _ in table))
        return np.concatenate(parts) if parts else np.array([])

    preds = {"template": tmpl}
    if explanation:  # no partner explanation: no shuffled baseline, never the head's own
        extra = {"shuffled": shuffled} if shuffled else {}
        if clause and clause != explanation:  # equal: the model added nothing
            extra["clause"] = clause
        got = await asyncio.gather(judged(explanation), *map(judged, extra.values()))
        preds["pair"] = got[0]
        preds.update(zip(extra, got[1:], strict=True))
        if clause and clause == explanation:
            preds["clause"] = preds["pair"]
    reasons = []
    for name in ("pair", "template", "shuffled", "clause"):
        for neg in ("easy", "hard"):
            p = preds.get(name)
            if p is None:
                value, why = math.nan, "no partner" if explanation else "no explanation"
            else:
                value, why = auc(p[labels == "pos"], p[labels == neg])
            row[f"{name}_auc_{neg}"] = value
            if why and name == "pair":
                reasons.append(f"{neg}: {why}")
    for neg in ("easy", "hard"):
        row[f"lift_{neg}"] = row[f"pair_auc_{neg}"] - row[f"template_auc_{neg}"]
        row[f"added_{neg}"] = row[f"pair_auc_{neg}"] - row[f"clause_auc_{neg}"]
    if errors:
        reasons.append(f"{len(errors)} pair requests failed; first: {errors[0]}")
    row["pair_error"] = "; ".join(reasons) or None
    return row
