"""Explain prompt v2: evidence before the excerpts, the template clause the embedded
model completes, and the 135M-only repairs kept to the embedded backend."""

from __future__ import annotations

import asyncio

import numpy as np
import pandas as pd
import pytest

from head_explain.errors import ConfigError
from head_explain.explain import (
    CLAUSE_MIN_SHARE,
    CLAUSES,
    COMPLETION_STOP,
    build_messages,
    cut_completion,
    explain_head,
    parse_explanation,
    template_clause,
)
from head_explain.prompts import load, load_explain

EVIDENCE = dict(
    head_class="previous_token", class_score=0.91, n_events=30, share_offset_0=0.0,
    share_offset_1=0.9, share_dup=0.05, share_induction=0.0, share_bos=0.05, top_offset=2,
    top_dest=["(", "x"], top_dest_count=[5, 3], top_src=["def", "x"], top_src_count=[4, 2],
)  # fmt: skip


def _events():
    toks = [" def", " f", "(", "x", ")", ":", " return", " x"]
    return pd.DataFrame(
        [
            dict(
                split="explain",
                rank=i,
                act_norm=10.0 - i,
                excerpt_tokens=toks,
                excerpt_dest=2 + i,
                excerpt_src=[1 + i],
            )  # fmt: skip
            for i in range(3)
        ]
    )


def test_versions_and_user_file(tmp_path):
    v1, v2 = load_explain("explain_v1"), load_explain("explain_v2")
    assert (v1.name, v2.name) == ("explain_v1", "explain_v2") and v1.sha != v2.sha
    path = tmp_path / "mine.txt"
    path.write_text("### system\nBe brief.\n### user\n$evidence\n\n$examples\n")
    mine = load_explain(str(path))
    assert mine.name == "file:mine" and len(mine.sha) == 16
    with pytest.raises(ConfigError, match="unknown version 'v3'"):
        load_explain("v3")


def test_v2_puts_evidence_before_the_excerpts():
    msgs = build_messages(load("explain_v2"), _events(), EVIDENCE)
    user = msgs[-1]["content"]
    assert msgs[-1]["role"] == "user"
    assert "previous token" in user and "the previous token (90%)" in user
    assert user.index("What was measured") < user.index("Excerpt 1") < user.index("Excerpt 3")
    assert '"(" (5)' in user  # frequent destination tokens with counts
    v1 = build_messages(load("explain_v1"), _events(), EVIDENCE)
    assert "What was measured" not in v1[-1]["content"]  # v1 is unchanged


def test_template_clauses():
    assert template_clause(EVIDENCE) == "This head attends to the previous token"
    assert "earlier copy" in template_clause(EVIDENCE | {"head_class": "duplicate_token"})
    assert "followed an earlier copy" in template_clause(EVIDENCE | {"head_class": "induction"})
    assert "itself" in template_clause(EVIDENCE | {"head_class": "self"})
    assert "3 positions back" in template_clause(
        EVIDENCE | {"head_class": "fixed_offset", "top_offset": 3}
    )
    # a content or sink head whose top events mostly (>= CLAUSE_MIN_SHARE) read one
    # template's source gets that template's clause; the class's own clause otherwise
    assert template_clause(EVIDENCE | {"head_class": "content"}) == CLAUSES["previous_token"]
    sink = EVIDENCE | {"head_class": "bos_sink", "share_offset_1": 0.1, "share_induction": 0.8}
    assert template_clause(sink) == CLAUSES["induction"]
    spread = {"share_offset_1": CLAUSE_MIN_SHARE - 0.01, "share_offset_0": 0.2,
              "share_induction": 0.0}  # fmt: skip
    assert template_clause(sink | spread) == CLAUSES["bos_sink"]
    content = template_clause(EVIDENCE | spread | {"head_class": "content"})
    assert content == 'This head attends from tokens like "(" and "x" to tokens like "def" and "x"'
    # a class with its own template keeps it, whatever the shares
    assert template_clause(EVIDENCE | {"head_class": "self"}) == CLAUSES["self"]


def test_repairs_only_for_the_embedded_model():
    reply = "This head attends from commas to nouns and from verbs to subjects."
    assert (
        parse_explanation(reply, repair=False)
        == "attends from commas to nouns and from verbs to subjects."
    )
    assert parse_explanation(reply, repair=True) == "attends from commas to nouns."
    assert parse_explanation("attends from X to Y. Second sentence.", repair=False).endswith(
        "Second sentence."
    )
    assert cut_completion(" the token is a name. Then more\nlines") == "the token is a name"
    assert cut_completion("  <<x>> follows [[y]],") == "x follows y"
    assert cut_completion("") == ""


def test_completion_stop_never_changes_the_cut():
    """The embedded model stops generating once COMPLETION_STOP matches; whatever it would
    have written after that point (any cut at or after the match) leaves cut_completion's
    answer unchanged. Random replies over the characters that matter."""
    import random
    import re

    rng = random.Random(0)
    alphabet = list("ab .!?,:<>[]") + ["\n", "\r", "\t", "\u2028", "\x0c", "  ", "x."]
    stop = re.compile(COMPLETION_STOP)
    matched = 0
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        m = stop.search(text)
        if m is None:
            continue
        matched += 1
        for k in range(m.end(), len(text) + 1):
            assert cut_completion(text[:k]) == cut_completion(text), (text, k)
    assert matched > 5000


@pytest.mark.slow
def test_embedded_model_completes_the_measured_clause():
    from head_explain.llm.embedded import EmbeddedBackend

    async def go():
        backend = EmbeddedBackend(cache=None)
        try:
            return await explain_head(backend, load("explain_v2"), 3, 1, _events(), 24, EVIDENCE)
        finally:
            await backend.aclose()

    row = asyncio.run(go())
    assert row["error"] is None, row
    assert row["template_clause"] == "attends to the previous token"
    assert row["explanation"].startswith("attends to the previous token")
    assert row["prompt_version"] == "explain_v2" and row["head_class"] == "previous_token"
    if row["model_completion"]:
        assert row["explanation"] == (
            f"attends to the previous token, most strongly when {row['model_completion']}."
        )
    assert isinstance(row["raw"], str) and np.isfinite(row["latency_s"])
