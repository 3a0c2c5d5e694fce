"""Prompt formatting, response parsing and the scoring maths (no LLM involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from head_explain import prompts
from head_explain.explain import build_messages, parse_explanation, render_excerpt
from head_explain.llm.base import TokenLogprob
from head_explain.simulate import (
    SEQUENCE_BREAK,
    Excerpt,
    baseline_assignment,
    build_chat_messages,
    build_echo_prompt,
    correlation,
    derangement,
    pooled_scores,
    request_batches,
)
from head_explain.simulation_replies import (
    chat_expected_values,
    expected_values,
    parse_chat_values,
)


def test_render_excerpt_marks_dest_and_sources():
    toks = ["The", " cat", " sat", "\n", " on", " it"]
    assert render_excerpt(toks, 4, [1, 4]) == "The [[cat]] sat\\n <<on>> it"


def test_explain_prompt_is_versioned_and_lists_examples():
    import pandas as pd

    tpl = prompts.load("explain_v1")
    ev = pd.DataFrame(
        dict(split=["explain", "explain", "score_top"], rank=[1, 0, 0], act_norm=[4.2, 10.0, 9.0],
             excerpt_tokens=[["a", " b"], ["c", " d"], ["e"]], excerpt_dest=[1, 1, 0], excerpt_src=[[0], [], []])
    )  # fmt: skip
    msgs = build_messages(tpl, ev)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    user = msgs[-1]["content"]
    assert 'Excerpt 1 (activation 10/10):\nc <<d>>\nPair: from "d" to earlier tokens' in user
    assert 'Excerpt 2 (activation 4/10):\n[[a]] <<b>>\nPair: from "b" to "a"' in user
    assert "Excerpt 3" not in user  # the held-out score_top event is never shown
    assert len(tpl.sha) == 16 and tpl.sha == prompts.load("explain_v1").sha


@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            '"attends from commas to the previous noun."',
            "attends from commas to the previous noun.",
        ),
        ("This head: attends from names to titles. It also...", "attends from names to titles."),
        ("attends from X to Y\nsecond line", "attends from X to Y."),
        (
            "attends from the following kinds of tokens:\n - macro tokens\n - x",
            "attends from macro tokens.",
        ),
        (
            'attends from the "the" token to the "the" token to the "the" token to the',
            'attends from the "the" token to the "the" token.',
        ),
        ("attends from the [[type]] of <<4>>", "attends from the type of 4."),
        ("attends from the following:\n - [Excerpt 1](https://x.y)", ""),
        ("This head is a language model that attends from a to b. More.", "attends from a to b."),
        ("", ""),
        ("  .", ""),
    ],
)
def test_parse_explanation(reply, expected):
    assert parse_explanation(reply) == expected


def test_echo_prompt_slots_point_at_placeholders():
    tpl = prompts.load("simulate_echo_v1")
    prompt, slots = build_echo_prompt(tpl, "attends from a to b", ["The", " cat", "\n"])
    assert len(slots) == 3
    for s in slots:
        assert prompt[s : s + len("unknown")] == "unknown"
        assert prompt[s - 1] == "\t"
    assert "\\n\tunknown\n<end>" in prompt
    assert "Explanation of the head: attends from a to b" in prompt


def test_expected_values_renormalise_over_present_candidates():
    vals = [str(i) for i in range(10)]
    lp = {"0": math.log(0.5), "4": math.log(0.25), "x": math.log(0.25)}
    out = expected_values([lp, None, {"y": 0.0}], vals)
    assert out[0] == pytest.approx((0 * 0.5 + 4 * 0.25) / 0.75)
    assert np.isnan(out[1]) and np.isnan(out[2])


@pytest.mark.parametrize(
    "text, n, ok",
    [
        ("[0, 1, 10]", 3, True),
        ("Sure! Here: [0,0,3]\n", 3, True),
        ("[0, 1]", 3, False),
        ("no array", 3, False),
        ("[0, 11, 2]", 3, False),
        ("[0, 'a', 2]", 3, False),
    ],
)
def test_parse_chat_values(text, n, ok):
    if ok:
        assert len(parse_chat_values(text, n)) == n
    else:
        with pytest.raises(ValueError):
            parse_chat_values(text, n)


def test_chat_expected_values_uses_top_logprobs():
    lps = [
        TokenLogprob("[", 0.0, {}),
        TokenLogprob("0", math.log(0.9), {"0": math.log(0.9), "10": math.log(0.1)}),
        TokenLogprob(",", 0.0, {}),
        TokenLogprob(" 5", math.log(1.0), {" 5": 0.0}),
        TokenLogprob("]", 0.0, {}),
    ]
    assert chat_expected_values(lps, 2) == pytest.approx([1.0, 5.0])
    assert chat_expected_values(lps, 3) is None


def test_correlation_matches_scipy_and_handles_degenerate_input():
    rng = np.random.default_rng(0)
    a, b = rng.random(50), rng.random(50)
    assert correlation(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    a[3] = np.nan
    ok = np.isfinite(a)
    assert correlation(a, b) == pytest.approx(stats.pearsonr(a[ok], b[ok])[0])
    assert math.isnan(correlation(np.ones(5), np.arange(5)))
    assert math.isnan(correlation([1.0], [2.0]))


def test_pooled_scores_pool_all_tokens():
    ex = [
        Excerpt("score_top", ["a"] * 3, np.array([0, 5, 10.0])),
        Excerpt("score_random", ["b"] * 3, np.array([0, 0, 1.0])),
    ]
    preds = [np.array([0, 4, 9.0]), np.array([1, 0, 0.0])]
    s = pooled_scores(ex, preds)
    assert s["score"] == pytest.approx(stats.pearsonr([0, 4, 9, 1, 0, 0], [0, 5, 10, 0, 0, 1])[0])
    assert s["score_top"] == pytest.approx(stats.pearsonr([0, 4, 9], [0, 5, 10])[0])
    assert math.isnan(pooled_scores(ex, [None, None])["score"])


def test_baseline_is_a_seeded_derangement():
    rng = np.random.default_rng(3)
    for n in range(2, 12):
        p = derangement(n, rng)
        assert sorted(p) == list(range(n)) and not (p == np.arange(n)).any()
    heads = [(0, i) for i in range(6)]
    a = baseline_assignment(heads, 0)
    assert a == baseline_assignment(heads, 0)
    assert all(k != v for k, v in a.items())


def test_echo_prompt_batches_excerpts_as_sequences():
    """Several excerpts in one echo prompt: each its own <start>..<end> sequence, every
    slot right after its token's tab, the single-excerpt prompt unchanged."""
    tpl = prompts.load("simulate_echo_v1")
    one, one_slots = build_echo_prompt(tpl, "x", ["a", "b"])
    text, slots = build_echo_prompt(tpl, "x", ["a", "b"], ["c"], ["d", "e"])
    assert len(slots) == 5 and text.count(SEQUENCE_BREAK) == 2
    assert text.startswith(one[: one_slots[-1]]) and slots[:2] == one_slots
    for s, tok in zip(slots, "abcde", strict=True):
        assert text[s - 2 : s] == f"{tok}\t" and text[s:].startswith("unknown\n")
    assert text[slots[-1] :] == one[one_slots[-1] :]  # the same close after the last token
    assert text[slots[1] :].startswith("unknown\n<end>\n<start>\nc\t")


def test_chat_prompt_numbers_batched_excerpts_on():
    tpl = prompts.load("simulate_chat_v2")
    msgs = build_chat_messages(tpl, "x", ["a", "b"], ["c"])
    user = msgs[-1]["content"]
    assert "1. 'a'\n2. 'b'\n\n3. 'c'" in user and "each of the 3 tokens" in user


def test_request_batches():
    ex = [Excerpt("score_top", ["a"], np.zeros(1)) for _ in range(5)]
    assert request_batches(ex, 1) == [[0], [1], [2], [3], [4]]
    assert request_batches(ex, 2) == [[0, 1], [2, 3], [4]]
    assert request_batches(ex, 9) == [[0, 1, 2, 3, 4]]
