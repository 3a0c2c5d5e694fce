"""Explanations: show the explainer a head's top events, get one sentence back.

Prompt v2 puts the head's measured class and evidence (evidence.py) in a short
plain-language block before the excerpts. A backend that cannot reason over evidence
(the embedded 135M model) is grounded by construction instead: the measured template
clause starts its answer ("This head attends to the previous token, most strongly
when") and the model only completes it; the clause and the model's part are recorded
separately. The 135M-only repairs (prefill, cutting runaway chains) apply to the
embedded backend only; a capable LLM's sentence is kept whole.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from head_explain.evidence import commonest_template
from head_explain.heads import head_name
from head_explain.llm.base import label_calls
from head_explain.prompts import PromptTemplate

log = logging.getLogger(__name__)

PROMPT = "explain_v1"  # the v1 prompt: no evidence, the plain prefill below
# Backends that continue a trailing assistant message get this prefill: a 135M model
# then answers in the requested form instead of drifting into lists.
PREFILL = "This head attends from"


def show_token(tok: str) -> str:
    """A token as the LLM should read it: whitespace made visible, never a newline."""
    return tok.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def render_excerpt(tokens: list[str], dest: int, srcs: list[int]) -> str:
    """Join tokens, marking the destination <<x>> and its top sources [[x]]."""
    src = set(srcs) - {dest}
    out = []
    for i, tok in enumerate(tokens):
        shown = show_token(tok)
        lead = shown[: len(shown) - len(shown.lstrip(" "))]
        body = shown.lstrip(" ") or shown
        if i == dest:
            out.append(f"{lead}<<{body}>>")
        elif i in src:
            out.append(f"{lead}[[{body}]]")
        else:
            out.append(shown)
    return "".join(out).strip()


def build_messages(
    template: PromptTemplate, head_events: pd.DataFrame, evidence: dict | None = None
) -> list[dict[str, str]]:
    """The explainer's prompt for one head from its `explain` events (ranked)."""
    ex = head_events[head_events["split"] == "explain"].sort_values("rank")
    blocks = [
        f"Excerpt {i} (activation {round(float(r.act_norm))}/10):\n"
        + render_excerpt(list(r.excerpt_tokens), int(r.excerpt_dest), list(r.excerpt_src))
        + "\n"
        + pair_line(list(r.excerpt_tokens), int(r.excerpt_dest), list(r.excerpt_src))
        for i, r in enumerate(ex.itertuples(index=False), 1)
    ]
    values = {"examples": "\n\n".join(blocks)}
    if "$evidence" in template.text or "${evidence}" in template.text:
        from head_explain.evidence import evidence_text

        values["evidence"] = evidence_text(evidence) if evidence is not None else "(not measured)"
    return template.messages(**values)


def pair_line(tokens: list[str], dest: int, srcs: list[int]) -> str:
    """'Pair: from "x" to "a", "b"': the event spelled out, which small models need."""
    names = [
        f'"{show_token(tokens[s]).strip() or show_token(tokens[s])}"' for s in srcs if s != dest
    ]
    target = ", ".join(names) if names else "earlier tokens outside the excerpt"
    return (
        f'Pair: from "{show_token(tokens[dest]).strip() or show_token(tokens[dest])}" to {target}'
    )


CLAUSES = {
    "previous_token": "This head attends to the previous token",
    "self": "This head attends to the current token itself",
    "duplicate_token": "This head attends to an earlier copy of the current token",
    "induction": "This head attends to the token that followed an earlier copy of the current token",
    "bos_sink": "This head attends mostly to the first token of the text",
}
WHEN = ", most strongly when"


# A content or BOS-sink head whose top events mostly read one template's source gets that
# template's clause. Its class says where its attention mass goes (a sink parks what it
# does not use); the clause starts a sentence about when it writes most strongly, which
# its top events measure. On the demo L4H2 and L6H4 (content: 0.07 and 0.18 mean
# attention on the previous token in natural text) read it in 97% and 92% of them.
CLAUSE_MIN_SHARE = 0.75


def template_clause(ev: dict | None) -> str:
    """The measured start of an embedded explanation, from the head's class/evidence."""
    if ev is None:
        return PREFILL
    cls = ev["head_class"]
    if cls in ("content", "bos_sink") and "share_offset_1" in ev:
        template, share = commonest_template(ev)
        if share >= CLAUSE_MIN_SHARE:
            return CLAUSES[template]
    if cls in CLAUSES:
        return CLAUSES[cls]
    if cls == "fixed_offset":
        return f"This head attends to the token {int(ev['top_offset'])} positions back"
    dest = [f'"{t}"' for t in list(ev["top_dest"])[:2]]
    src = [f'"{t}"' for t in list(ev["top_src"])[:2]]
    if not dest or not src:
        return PREFILL
    return f"This head attends from tokens like {' and '.join(dest)} to tokens like {' and '.join(src)}"


# Where cut_completion's answer is settled: after some text, a sentence end followed by
# whitespace, or a line break (every break str.splitlines knows). The embedded model stops
# there (tests/test_explain_simulate_unit.py checks the cut is the same either way).
_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
COMPLETION_STOP = rf"\S[^{_BREAKS}]*?(?:[.!?]\s|[{_BREAKS}])"


def cut_completion(text: str) -> str:
    """The model's continuation of a clause, cut at its first sentence end or line."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    for mark in ("<<", ">>", "[[", "]]"):
        text = text.replace(mark, "")
    words = text.split()
    return " ".join(words[:25]).rstrip(" ,;:.").strip()


def parse_explanation(text: str, repair: bool = True) -> str:
    """One clean sentence from the reply; '' if nothing usable.

    Small explainers drift: a lead-in ("This head is a model that"), a list after a
    colon, the prompt's own markers, or a runaway "to X to Y to Z" chain. Each is cut
    back to the sentence it was trying to say.
    """
    text = text.strip().strip('"').strip()
    if not repair:  # a capable LLM: its first line, whole
        text = re.sub(r"^(this head|the head|answer|explanation)\s*[:\-]?\s*", "", text, flags=re.I)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        first = first.replace("<<", "").replace(">>", "").replace("[[", "").replace("]]", "")
        first = first.strip().strip('"').strip()
        if len(first) < 3 or _has_link(first):
            return ""
        return first if first.endswith((".", "!", "?")) else first + "."
    found = re.search(r"\battends\b", text, flags=re.I)
    if found and found.start() < 120:
        text = text[found.start() :]
    text = re.sub(r"^(this head|the head|answer|explanation)\s*[:\-]?\s*", "", text, flags=re.I)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return ""
    first = re.split(r"(?<=[.!?])\s", lines[0], maxsplit=1)[0].strip()
    if first.endswith(":") and len(lines) > 1:  # "attends from the following tokens:\n- x"
        item = re.sub(r"^[-*\d.)\s]+", "", lines[1]).strip()
        lead = re.match(r"attends (from|to)\b", first, flags=re.I)
        first = f"{lead.group(0)} {item}" if lead and item else ""
    first = first.replace("<<", "").replace(">>", "").replace("[[", "").replace("]]", "")
    if _has_link(first):
        return ""
    chain = re.match(r"(attends from .+? to .+?)(?: to | and .+? to )", first, flags=re.I)
    if chain:  # keep "attends from A to B", drop the runaway repetition after it
        first = chain.group(1)
    first = re.sub(r"\s+", " ", first).strip().strip('"').rstrip(",;:").strip()
    if len(first) < 3 or first.lower() in ("attends from", "attends from the"):
        return ""
    return first if first.endswith((".", "!", "?")) else first + "."


def _has_link(text: str) -> bool:
    """A link or image is never a description of a head, whoever wrote it: unusable."""
    return "](" in text or "http" in text


async def explain_head(
    backend, template: PromptTemplate, layer: int, head: int, events: pd.DataFrame,
    max_tokens: int, evidence: dict | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One head -> one explanations.jsonl row; an LLM failure is a recorded error."""
    row: dict[str, Any] = dict(
        layer=layer, head=head, head_name=head_name(layer, head), explanation="",
        explainer_model=backend.model, prompt_version=template.name, prompt_sha=template.sha,
        head_class=(evidence or {}).get("head_class", ""), template_clause="",
        model_completion="", prompt_tokens=0, completion_tokens=0, latency_s=0.0, cost_usd=0.0,
        raw=None, error=None,
    )  # fmt: skip
    messages = build_messages(template, events, evidence)
    prefill = backend.kind == "embedded"
    grounded = prefill and template.name != PROMPT  # v2 or a user prompt on the 135M model
    if grounded:
        clause = template_clause(evidence)
        row["template_clause"] = clause_body(clause)
        messages.append({"role": "assistant", "content": clause + WHEN})
        return await _complete_clause(backend, messages, max_tokens, row, clause)
    if prefill:
        messages.append({"role": "assistant", "content": PREFILL})

    def usable(res) -> None:  # retried; if it stays unusable the verdict is cached
        if not parse_explanation(
            f"{PREFILL} {res.text.lstrip()}" if prefill else res.text, repair=prefill
        ):
            raise ValueError(f"empty or unusable explanation (reply {res.text[:80]!r})")

    res = await _chat_into(backend, messages, max_tokens, row, validate=usable)
    if res is None:
        return row
    row["explanation"] = parse_explanation(
        f"{PREFILL} {res.text.lstrip()}" if prefill else res.text, repair=prefill
    )
    row["model_completion"] = row["explanation"]
    if not row["explanation"]:
        row["error"] = "empty or unusable explanation"
    return row


async def _chat_into(
    backend, messages, max_tokens: int, row: dict, validate=None, stop_pattern: str = ""
):
    """One explainer call; its accounting goes into `row`. None (and row["error"]) when
    the call failed: recorded, never a crashed stage."""
    try:
        res = await backend.chat(
            messages, max_tokens=max_tokens, validate=validate, stop_pattern=stop_pattern
        )
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return None
    row.update(
        prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
        latency_s=round(res.latency_s, 3), cost_usd=res.cost_usd, raw=res.text,
    )  # fmt: skip
    return res


def clause_body(clause: str) -> str:
    """The measured clause as explanations.jsonl records it: without "This head "."""
    return clause.removeprefix("This head ").strip()


def clause_alone(record: dict) -> str:
    """The measured clause of a grounded explanation as a sentence of its own (what the
    explanation says without the model's part); "" when it has none."""
    clause = (record.get("template_clause") or "").strip()
    return f"{clause}." if clause and record.get("explanation") else ""


async def _complete_clause(backend, messages, max_tokens: int, row: dict, clause: str) -> dict:
    """The embedded model completes the measured clause; explanation = clause + its part."""
    res = await _chat_into(backend, messages, max_tokens, row, stop_pattern=COMPLETION_STOP)
    if res is None:
        return row
    part = cut_completion(res.text)
    row["model_completion"] = part
    body = clause_body(clause)
    row["explanation"] = f"{body}{WHEN} {part}." if part else f"{body}."
    return row


async def explain_all(
    backend,
    template: PromptTemplate,
    events: pd.DataFrame,
    max_tokens: int,
    on_row: Callable[[dict[str, Any]], None],
    skip: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
    progress=None,
    evidence: dict | None = None,
) -> None:
    """Explain every head in `events` not in `skip`; `on_row` sees each as it finishes."""
    groups = [(k, g) for k, g in events.groupby(["layer", "head"], sort=True) if k not in skip]

    async def one(key, grp):
        label_calls(head=head_name(int(key[0]), int(key[1])))  # for the call records
        ev = (evidence or {}).get((int(key[0]), int(key[1])))
        row = await explain_head(backend, template, int(key[0]), int(key[1]), grp, max_tokens, ev)
        on_row(row)
        if progress is not None:
            progress.update(1)

    await asyncio.gather(*(one(k, g) for k, g in groups))
