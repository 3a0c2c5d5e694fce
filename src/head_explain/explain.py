"""Explanations: show the explainer a head's top events, get one sentence back."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import pandas as pd

from head_explain.heads import head_name
from head_explain.llm.base import label_calls
from head_explain.prompts import PromptTemplate

log = logging.getLogger(__name__)

PROMPT = "explain_v1"
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


def build_messages(template: PromptTemplate, head_events: pd.DataFrame) -> list[dict[str, str]]:
    """The explainer's prompt for one head from its `explain` events (ranked)."""
    ex = head_events[head_events["split"] == "explain"].sort_values("rank")
    blocks = [
        f"Excerpt {i} (activation {round(float(r.act_norm))}/10):\n"
        + render_excerpt(list(r.excerpt_tokens), int(r.excerpt_dest), list(r.excerpt_src))
        + "\n"
        + pair_line(list(r.excerpt_tokens), int(r.excerpt_dest), list(r.excerpt_src))
        for i, r in enumerate(ex.itertuples(index=False), 1)
    ]
    return template.messages(examples="\n\n".join(blocks))


def pair_line(tokens: list[str], dest: int, srcs: list[int]) -> str:
    """'Pair: from "x" to "a", "b"': the event spelled out, which small models need."""
    names = [
        f'"{show_token(tokens[s]).strip() or show_token(tokens[s])}"' for s in srcs if s != dest
    ]
    target = ", ".join(names) if names else "earlier tokens outside the excerpt"
    return (
        f'Pair: from "{show_token(tokens[dest]).strip() or show_token(tokens[dest])}" to {target}'
    )


def parse_explanation(text: str) -> str:
    """One clean sentence from the reply; '' if nothing usable.

    Small explainers drift: a lead-in ("This head is a model that"), a list after a
    colon, the prompt's own markers, or a runaway "to X to Y to Z" chain. Each is cut
    back to the sentence it was trying to say.
    """
    text = text.strip().strip('"').strip()
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
    if "](" in first or "http" in first:
        return ""
    chain = re.match(r"(attends from .+? to .+?)(?: to | and .+? to )", first, flags=re.I)
    if chain:  # keep "attends from A to B", drop the runaway repetition after it
        first = chain.group(1)
    first = re.sub(r"\s+", " ", first).strip().strip('"').rstrip(",;:").strip()
    if len(first) < 3 or first.lower() in ("attends from", "attends from the"):
        return ""
    return first if first.endswith((".", "!", "?")) else first + "."


async def explain_head(
    backend, template: PromptTemplate, layer: int, head: int, events: pd.DataFrame, max_tokens: int
) -> dict[str, Any]:
    """One head -> one explanations.jsonl row; an LLM failure is a recorded error."""
    row: dict[str, Any] = dict(
        layer=layer, head=head, head_name=head_name(layer, head), explanation="",
        explainer_model=backend.model, prompt_version=template.name, prompt_sha=template.sha,
        prompt_tokens=0, completion_tokens=0, latency_s=0.0, cost_usd=0.0, raw=None, error=None,
    )  # fmt: skip
    messages = build_messages(template, events)
    prefill = backend.kind == "embedded"
    if prefill:
        messages.append({"role": "assistant", "content": PREFILL})

    def usable(res) -> None:  # retried; if it stays unusable the verdict is cached
        if not parse_explanation(f"{PREFILL} {res.text.lstrip()}" if prefill else res.text):
            raise ValueError(f"empty or unusable explanation (reply {res.text[:80]!r})")

    try:
        res = await backend.chat(messages, max_tokens=max_tokens, validate=usable)
    except Exception as exc:  # recorded, never a crashed stage
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return row
    row.update(
        prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens,
        latency_s=round(res.latency_s, 3), cost_usd=res.cost_usd, raw=res.text,
    )  # fmt: skip
    row["explanation"] = parse_explanation(
        f"{PREFILL} {res.text.lstrip()}" if prefill else res.text
    )
    if not row["explanation"]:
        row["error"] = "empty or unusable explanation"
    return row


async def explain_all(
    backend,
    template: PromptTemplate,
    events: pd.DataFrame,
    max_tokens: int,
    on_row: Callable[[dict[str, Any]], None],
    skip: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
    progress=None,
) -> None:
    """Explain every head in `events` not in `skip`; `on_row` sees each as it finishes."""
    groups = [(k, g) for k, g in events.groupby(["layer", "head"], sort=True) if k not in skip]

    async def one(key, grp):
        label_calls(head=head_name(int(key[0]), int(key[1])))  # for the call records
        row = await explain_head(backend, template, int(key[0]), int(key[1]), grp, max_tokens)
        on_row(row)
        if progress is not None:
            progress.update(1)

    await asyncio.gather(*(one(k, g) for k, g in groups))
