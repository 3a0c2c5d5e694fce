"""Evidence per head, pair candidates/marking, template predictors, pair AUC, headline.

Pure functions on hand-made inputs whose answers are worked out here by hand.
"""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from head_explain.evidence import (
    FIRST,
    TEMPLATE_WORDS,
    build_evidence,
    evidence_text,
    head_evidence,
    main_source_kinds,
    pair_template,
    word_key,
)
from head_explain.headline import beats_baselines
from head_explain.pair_candidates import candidate_pairs, mark_pairs
from head_explain.pair_scoring import (
    auc,
    build_pair_echo,
    continues_here,
    follows_copy,
    pair_relation,
    pair_table,
    score_pairs,
    template_predicts,
    yes_probability,
)
from head_explain.prompts import load

# window 0: BOS=0, then tokens; 5 repeats at 2 and 5, 6 follows the first 5
TOKENS = {0: np.array([0, 9, 5, 6, 7, 5, 6, 8]), 1: np.array([0, 4, 4, 3, 2, 1, 9, 8])}


def _top(rows):
    return pd.DataFrame(
        [dict(window_id=w, pos=p, src_pos=np.array(s), act=1.0) for w, p, s in rows]
    )


def test_head_evidence_shares_and_counts():
    top = _top(
        [
            (0, 5, [2, 4]),  # earlier copy of 5 (offset 3)
            (0, 6, [3, 5]),  # earlier copy of 6 (offset 3)
            (0, 4, [3]),  # previous token
            (1, 2, [1]),  # previous token, also an earlier copy (4 == 4)
            (1, 3, [0]),  # BOS
        ]
    )
    ev = head_evidence(top, TOKENS, lambda t: f"t{t}", {t: 0.1 for t in range(10)})
    assert ev["n_events"] == 5
    assert ev["share_offset_1"] == pytest.approx(2 / 5)
    assert ev["share_offset_3"] == pytest.approx(2 / 5)  # (5->2) and (6->3)
    assert ev["share_bos"] == pytest.approx(1 / 5)
    assert ev["share_dup"] == pytest.approx(3 / 5)  # (0: 5->2), (0: 6->3), (1: 2->1)
    assert ev["share_induction"] == pytest.approx(0.0)  # tok[s-1] never equals tok[d]
    assert ev["main_offset"] in (1, 3) and ev["main_offset_share"] == pytest.approx(0.4)
    assert ev["top_src"][0] in ("t6", "t4") and sum(ev["top_src_count"]) == 5
    assert FIRST in ev["top_src"]  # BOS is named, not shown as its token text
    # lift: a token that is 10% of the corpus and 20% of the events has lift 2
    i = ev["top_dest"].index("t4")
    assert ev["top_dest_count"][i] == 1 and ev["top_dest_lift"][i] == pytest.approx(2.0)


def test_induction_share_counts_the_token_after_a_copy():
    top = _top([(0, 5, [3]), (0, 6, [5])])  # 5 at 5: src 3 (6) follows the earlier 5 (2)
    ev = head_evidence(top, TOKENS, str, {})
    assert ev["share_induction"] == pytest.approx(0.5)


def test_evidence_counts_a_case_variant_as_a_copy():
    """Token 9 renders " Five" and 5 "five": the pair (5 at 2 -> 9 at 1) is a copy."""
    text = {9: " Five", 5: "five"}
    top = _top([(0, 2, [1]), (0, 3, [2])])
    ev = head_evidence(top, TOKENS, lambda t: text.get(t, f"t{t}"), {})
    assert ev["share_dup"] == pytest.approx(0.5)  # only (2 -> 1); exact ids would give 0
    assert head_evidence(top, TOKENS, lambda t: f"t{t}", {})["share_dup"] == 0.0


def test_build_evidence_class_and_template_and_text():
    windows = pd.DataFrame({"window_id": [0, 1], "tokens": [TOKENS[0], TOKENS[1]]})
    pools = {(3, 1): _top([(0, 4, [3]), (0, 5, [4]), (1, 2, [1])])}
    types = pd.DataFrame(
        [dict(layer=3, head=1, head_class="content", class_score=0.2, second_class="",
              top_offset=2)]
    )  # fmt: skip
    ev = build_evidence(pools, windows, str, types)
    row = ev.iloc[0].to_dict()
    assert row["head_name"] == "L3H1" and row["head_class"] == "content"
    # a content head's hard negatives fit the template with the largest share: previous
    assert row["pair_template"] == "previous_token" == pair_template("content", row)
    assert pair_template("induction", row) == "induction"
    text = evidence_text(row)
    assert "content" in text and "the previous token (100%)" in text
    assert "Frequent destination tokens" in text


def test_candidate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    h, n = 2, 7
    pattern = torch.rand(h, n, n).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    vnorm = torch.rand(h, n) + 0.5
    tokens = torch.tensor([0, 5, 6, 5, 6, 7, 5])
    out = candidate_pairs(pattern, vnorm, tokens, rng)
    w = (pattern * vnorm[:, None, :]).numpy()
    assert out[1]["prev_write"][4] == pytest.approx(w[1, 4, 3])
    assert out[0]["self_write"][2] == pytest.approx(w[0, 2, 2])
    assert out[0]["dup_src"][6] == 3 and out[0]["dup_write"][6] == pytest.approx(w[0, 6, 3])
    assert out[0]["ind_src"][6] == 4  # the 6 after the latest earlier 5 (at 3)
    assert out[0]["ind_src"][4] == 3 and out[0]["dup_src"][4] == 2
    assert out[0]["dup_src"][5] == -1 and math.isnan(out[0]["dup_write"][5])
    r = out[0]["rand_src"]
    assert r[0] == r[1] == -1 and all(1 <= r[d] < d for d in range(2, n))


def _event(split, pos, src_pos, src_write, start, end, window_id=0):
    return SimpleNamespace(split=split, pos=pos, src_pos=np.array(src_pos),
                           src_write=np.array(src_write), excerpt_start=start,
                           excerpt_end=end, window_id=window_id)  # fmt: skip


def test_mark_pairs_positive_is_the_main_source_only():
    rng = np.random.default_rng(0)
    ev = _event("score_top", 6, [5, 0, 1], [9.0, 4.0, 1.0], 2, 8)
    got = mark_pairs(ev, None, 10.0, "previous_token", rng)
    assert list(got["pair_dest"]) == [4] and list(got["pair_src"]) == [3]
    assert got["pair_label"] == ["pos"] and got["pair_write"][0] == pytest.approx(9.0)
    # main source at BOS or before the excerpt: no positive (never the runner-up source)
    for src in ([0, 5, 1], [1, 5]):
        got = mark_pairs(_event("score_top", 6, src, [9.0, 4.0, 1.0], 2, 8), None, 10.0, "", rng)
        assert got["pair_label"] == []
    # the head's other top events in that window: a positive each when their
    # destination is shown (the event itself and one outside the excerpt are not repeated)
    others = [
        ev,
        _event("score_top", 4, [3], [2.0], 0, 0),
        _event("score_top", 9, [7], [1.0], 0, 0),
    ]
    got = mark_pairs(ev, None, 10.0, "previous_token", np.random.default_rng(0), others)
    assert list(got["pair_dest"]) == [4, 2] and list(got["pair_src"]) == [3, 1]
    assert got["pair_label"] == ["pos", "pos"]


def test_mark_pairs_negatives_are_low_write_and_inside():
    n = 10
    cand = SimpleNamespace(
        rand_src=np.array([-1, -1, 1, 1, 2, 4, 5, 1, 6, 8]),
        rand_write=np.array([np.nan, np.nan, 0.5, 0.01, 0.02, 3.0, 0.03, 0.04, 0.05, 0.06]),
        prev_write=np.array([np.nan, np.nan, 0.01, 5.0, 0.02, 0.03, 6.0, 0.04, 0.05, 0.06]),
        self_write=np.zeros(n), dup_src=np.full(n, -1), dup_write=np.full(n, np.nan),
        ind_src=np.full(n, -1), ind_write=np.full(n, np.nan),
    )  # fmt: skip
    ev = _event("score_random", 8, [], [], 3, 10)
    got = mark_pairs(ev, cand, 1.0, "previous_token", np.random.default_rng(0))  # limit 0.1
    pairs = list(zip(got["pair_dest"] + 3, got["pair_src"] + 3, got["pair_label"], strict=True))
    assert all(s >= 3 for _, s, _ in pairs)  # sources inside the excerpt
    easy = [(d, s) for d, s, lab in pairs if lab == "easy"]
    hard = [(d, s) for d, s, lab in pairs if lab == "hard"]
    assert sorted(easy) == [(6, 5), (8, 6), (9, 8)]  # (5, 4) writes 3.0: not low
    assert len(hard) == 3 and all(s == d - 1 for d, s in hard)
    assert (6, 5) not in hard  # previous-token write 6.0 is not low
    assert all(w < 0.1 for w in got["pair_write"])


def test_template_predictors():
    toks = ["a", "b", "c", "a", "b"]
    assert template_predicts("previous_token", toks, 3, 2) == 1.0
    assert template_predicts("previous_token", toks, 3, 1) == 0.0
    assert template_predicts("self", toks, 2, 2) == 1.0
    assert template_predicts("duplicate_token", toks, 3, 0) == 1.0
    assert template_predicts("duplicate_token", toks, 4, 0) == 0.0
    assert template_predicts("induction", toks, 3, 1) == 1.0  # b followed the earlier a
    assert template_predicts("induction", toks, 4, 2) == 1.0
    assert template_predicts("content", toks, 4, 2) == 0.0


def test_induction_template_takes_a_fuzzy_match():
    """At "eval" an induction head reads the "()" after an earlier "exec": the strict
    rule misses it, `continues_here` takes it because "()" comes next here too."""
    toks = ["exec", "()", " x", "eval", "()"]
    assert not follows_copy(toks, 3, 1) and continues_here(toks, 3, 1)
    assert template_predicts("induction", toks, 3, 1) == 1.0
    assert template_predicts("induction", toks, 3, 2) == 0.0  # " x" does not come next
    assert not continues_here(toks, 4, 1)  # nothing comes after the last token
    assert not continues_here(["a", "b"], 0, 0)  # an earlier copy only
    assert template_predicts("duplicate_token", toks, 3, 1) == 0.0  # induction only
    # the pair wording keeps to what is true of the pair: "()" did not follow a copy
    assert TEMPLATE_WORDS["induction"] not in pair_relation(toks, 3, 1)
    assert TEMPLATE_WORDS["induction"] in pair_relation(["a", "b", "a"], 2, 1)


def test_copies_are_copies_of_a_word():
    """Case and surrounding space aside: " Shared" copies "shared"; "\\n" stays itself."""
    toks = [" Shared", " memory", "\n", "shared", " Memory", "\n", " shares"]
    assert word_key(" Shared") == word_key("shared") == "shared"
    assert word_key("\n") == "\n" and word_key(" ") != word_key("\n")
    assert template_predicts("duplicate_token", toks, 3, 0) == 1.0
    assert template_predicts("duplicate_token", toks, 5, 2) == 1.0
    assert template_predicts("duplicate_token", toks, 6, 0) == 0.0  # another word
    # " memory" (1) follows " Shared" (0), a copy of "shared" (3)
    assert template_predicts("induction", toks, 3, 1) == 1.0
    assert template_predicts("induction", toks, 4, 1) == 0.0  # " Shared" is not " Memory"
    assert template_predicts("induction", ["a", " B", "c", "b"], 3, 2) == 1.0
    words = [word_key(t) for t in ["<bos>", *toks]]  # evidence windows start with BOS
    assert main_source_kinds(words, 4, 1)["dup"] and main_source_kinds(words, 4, 2)["induction"]


def test_auc_and_undefined():
    value, why = auc(np.array([0.9, 0.8]), np.array([0.1, 0.85, 0.2]))
    assert value == pytest.approx(5 / 6) and why is None
    assert auc(np.array([1.0, 1.0]), np.array([0.0]))[0] == 1.0
    assert auc(np.array([1.0, 0.0]), np.array([0.0, 0.0]))[0] == pytest.approx(0.75)  # ties
    v, why = auc(np.array([np.nan]), np.array([0.1]))
    assert math.isnan(v) and why == "no judged positive pairs"
    assert auc(np.array([0.5]), np.array([]))[1] == "no judged negative pairs"


def test_yes_probability():
    assert yes_probability({" yes": math.log(0.3), " no": math.log(0.1)}) == pytest.approx(0.75)
    assert yes_probability({" yes": math.log(0.2)}) == pytest.approx(0.2)
    assert yes_probability({" no": math.log(0.2)}) == pytest.approx(0.8)
    assert math.isnan(yes_probability(None)) and math.isnan(yes_probability({}))


def test_pair_echo_prompt_has_one_slot_per_pair():
    toks = ["The", " cat", " sat", " on", " the", " cat"]
    prompt, slots = build_pair_echo(
        load("pairs_echo_v1"), "attends to cats", toks, [(5, 1), (3, 2)]
    )
    assert len(slots) == 2
    assert prompt[: slots[0]].endswith('from "cat" to "cat" (4 tokens back):')
    assert prompt[: slots[1]].endswith('from "on" to "sat" (1 token back):')
    assert "Explanation of the head: attends to cats" in prompt


def test_pair_relations_use_the_explanations_words():
    """pairs_v2 words each pair as explanations do; v1 keeps offsets only."""
    toks = ["The", " cat", " sat", " on", " the", " cat", " sat"]
    assert pair_relation(toks, 5, 1) == "4 tokens back; an earlier copy of the current token"
    assert pair_relation(toks, 6, 5) == "the previous token"
    assert pair_relation(toks, 3, 3) == "the current token itself"
    # " on" (3) follows the earlier " sat" (2), a copy of the destination " sat" (6)
    assert pair_relation(toks, 6, 3) == (
        "3 tokens back; the token that followed an earlier copy of the current token"
    )
    prompt, slots = build_pair_echo(
        load("pairs_echo_v2"), "attends to cats", toks, [(5, 1), (6, 5)], relations=True
    )
    assert prompt[: slots[0]].endswith(
        'from "cat" to "cat" (4 tokens back; an earlier copy of the current token):'
    )
    assert prompt[: slots[1]].endswith('from "sat" to "cat" (the previous token):')
    assert prompt.rstrip().endswith("(the previous token): ?") and len(slots) == 2


def _events_with_pairs():
    rows = [
        dict(split="score_top", rank=0, excerpt_tokens=["a", "b", "c", "d"],
             pair_dest=np.array([2]), pair_src=np.array([1]), pair_label=["pos"]),
        dict(split="score_top", rank=1, excerpt_tokens=["x", "y", "z"],
             pair_dest=np.array([2]), pair_src=np.array([1]), pair_label=["pos"]),
        dict(split="score_random", rank=0, excerpt_tokens=["p", "q", "r", "s"],
             pair_dest=np.array([3, 2, 3]), pair_src=np.array([0, 1, 2]),
             pair_label=["easy", "hard", "hard"]),
        dict(split="explain", rank=0, excerpt_tokens=["e"], pair_dest=np.array([], int),
             pair_src=np.array([], int), pair_label=[]),
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_template_baseline_without_llm():
    """The template predictor is deterministic: previous-token pairs are its positives."""
    table = pair_table(_events_with_pairs())
    assert [len(p) for _, p, _ in table] == [3, 1, 1]
    row = asyncio.run(score_pairs(None, "echo", {}, "", "", "previous_token", _events_with_pairs()))
    # positives (2,1),(2,1) fit; easy (3,0) does not; hard (2,1),(3,2) fit
    assert row["template_auc_easy"] == 1.0 and row["template_auc_hard"] == 0.5
    assert math.isnan(row["pair_auc_easy"]) and row["n_pairs_pos"] == 2
    assert row["template_sentence"].startswith("attends from each token to the previous")


def test_headline_fraction_and_interval():
    scores = pd.DataFrame(
        dict(
            pair_auc_easy=[0.9, 0.6, 0.8, np.nan],
            template_auc_easy=[0.5, 0.7, 0.6, 0.5],
            shuffled_auc_easy=[0.5, 0.5, 0.85, 0.5],
        )
    )
    h = beats_baselines(scores, "easy", n_boot=500)
    assert (
        h["fraction"] == pytest.approx(1 / 3, abs=1e-4)
        and h["n_heads"] == 3
        and h["n_undefined"] == 1
    )
    assert 0 <= h["ci95"][0] <= 1 / 3 <= h["ci95"][1] <= 1
    assert beats_baselines(scores.iloc[:0], "easy")["fraction"] is None
    assert beats_baselines(pd.DataFrame({"x": [1]}))["n_heads"] == 0
