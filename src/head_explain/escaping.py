"""Untrusted text (corpus tokens, LLM replies) -> inert one-line Markdown, and numbers
for display and JSON.

An explanation or a token may contain `|`, `<script>`, `](javascript:...)` or a
newline. Every such string goes through `md_escape`, which leaves one line of inert
text, so the report renders the same on GitHub and in the MLflow UI whatever the model
wrote.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import numpy as np

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#$])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_NEWLINES = re.compile(r"\r\n|\r|\n")


def md_escape(text: Any, max_len: int | None = None) -> str:
    """Untrusted text -> one line of literal Markdown (safe in table cells too).

    HTML specials become entities (no tags, no entity tricks), Markdown punctuation that
    could open emphasis, code, links, tables, strikethrough, math or headings gets a
    backslash, newlines become spaces, and a leading list/quote marker is neutralised.
    """
    s = "" if text is None else str(text)
    s = _NEWLINES.sub(" ", s).replace("\t", " ")
    s = _CONTROL.sub("", s)
    if max_len is not None and len(s) > max_len:
        s = s[: max_len - 1] + "…"
    s = html.escape(s, quote=False)
    s = _MD_SPECIAL.sub(r"\\\1", s)
    # a string that starts a line must not open a list, heading or thematic break
    s = re.sub(r"^(\s*)([-+=])", r"\1\\\2", s)
    s = re.sub(r"^(\s*\d+)([.)])", r"\1\\\2", s)
    return s


def _visible(tok: str) -> str:
    """Whitespace tokens made visible so an excerpt stays one readable line."""
    return _NEWLINES.sub("↵", tok).replace("\t", "⇥")


def render_excerpt(tokens: list[str], dest: int, srcs: list[int] | None = None) -> str:
    """One-line excerpt: <b>destination</b> and \\[\\[source\\]\\] tokens marked.

    `<b>` is used rather than `**` because emphasis delimiters next to punctuation
    tokens often fail CommonMark's flanking rules and would show as literal stars.
    """
    src_set = {int(i) for i in (srcs or [])}
    parts = []
    for i, raw in enumerate(tokens):
        tok = _visible(str(raw))
        marked = i == dest or i in src_set
        core = tok.strip(" ")
        if not core:
            if not marked:
                parts.append(" " if tok else "")
                continue
            core, lead, trail = "␣", "", ""
        else:
            lead = " " if tok.startswith(" ") else ""
            trail = " " if tok.endswith(" ") else ""
        esc = md_escape(core)
        if i in src_set:
            esc = f"\\[\\[{esc}\\]\\]"
        if i == dest:
            esc = f"<b>{esc}</b>"
        parts.append(lead + esc + trail)
    return re.sub(r" {2,}", " ", "".join(parts)).strip()


def is_finite(x: Any) -> bool:
    try:
        return x is not None and not isinstance(x, bool) and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt(x: Any, digits: int = 3) -> str:
    """A number for display; None/NaN -> "n/a"."""
    if not is_finite(x):
        return "n/a"
    return f"{float(x):.{digits}f}"


def json_num(x: Any, digits: int | None = None) -> float | int | None:
    """A JSON-safe number: NaN/inf -> None, numpy scalars -> Python."""
    if not is_finite(x):
        return None
    if isinstance(x, (int, np.integer)):
        return int(x)
    v = float(x)
    return round(v, digits) if digits is not None else v
