"""The demo's shape, tiny: every head classified, heads chosen by class, evidence,
grounded explanations on the embedded backend, both scores with their baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from head_explain.cli import main
from head_explain.head_types import CLASSES

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_tiny_head_aware_run(tmp_path):
    out = tmp_path / "out"
    args = [
        "--params", str(REPO / "params.yaml"), "--outdir", str(out),
        "--llm-cache", str(tmp_path / "cache.sqlite"), "--windows", "40", "--window-len", "32",
        "--max-heads", "5", "--type-windows", "4", "--topk", "8", "--candidates", "16",
        "--random-windows", "6", "--explain-examples", "3", "--score-top-examples", "2",
        "--score-random-examples", "2", "--excerpt-len", "12", "--until", "simulate",
    ]  # fmt: skip
    assert main(args) == 0
    types = pd.read_parquet(out / "head_types.parquet")
    assert len(types) == 30 * 9 and set(types["head_class"]) <= set(CLASSES)
    assert types[["syn_prev", "syn_induction", "nat_bos"]].notna().all().all()
    # head_choice=classes: the strongest head of each class comes first
    evidence = pd.read_parquet(out / "evidence.parquet")
    assert len(evidence) == 5 and evidence["head_class"].nunique() >= 4
    strongest_prev = types[types["head_class"] == "previous_token"].nlargest(1, "class_score")
    assert strongest_prev["head_name"].iloc[0] in set(evidence["head_name"])
    rows = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert {r["prompt_version"] for r in rows} == {"explain_v2"}
    for r in rows:
        assert r["explanation"].startswith(r["template_clause"]), r
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 5
    assert scores["score"].notna().sum() >= 4  # most heads scored per token
    for col in ("pair_auc_easy", "template_auc_easy", "shuffled_auc_easy", "lift_easy",
                "pair_auc_hard", "template_auc_hard", "shuffled_auc_hard", "lift_hard"):  # fmt: skip
        assert col in scores.columns
    assert scores["template_auc_easy"].notna().sum() >= 1
    undefined = scores[scores["pair_auc_easy"].isna()]
    assert undefined["pair_error"].notna().all()  # a score that is missing says why
    assert np.isfinite(scores["pair_auc_easy"]).sum() >= 1
    # what the model added: the measured clause alone judged on the same pairs
    by_head = {(r["layer"], r["head"]): r for r in rows}
    judged = scores[np.isfinite(scores["pair_auc_easy"])]
    assert np.isfinite(judged["clause_auc_easy"]).all()
    np.testing.assert_allclose(
        judged["added_easy"], judged["pair_auc_easy"] - judged["clause_auc_easy"]
    )
    for r in judged.itertuples():
        if (
            by_head[(r.layer, r.head)]["explanation"]
            == by_head[(r.layer, r.head)]["template_clause"] + "."
        ):
            assert r.added_easy == 0  # no model part: nothing added
    metrics = json.loads((out / "metrics" / "simulate.json").read_text())
    assert "mean_clause_auc_easy" in metrics and "mean_added_easy" in metrics
    # --plan after the run: exactly the stage's requests (clause judging included), all
    # of them now in the cache
    from head_explain import config
    from head_explain.plan import plan

    flags = dict(zip([a[2:].replace("-", "_") for a in args[2:-2:2]], args[3:-2:2], strict=True))
    cfg = config.load_params(REPO / "params.yaml", flags)
    simulate = plan(cfg)["stages"][1]
    sent = metrics["llm"]["requests"] + metrics["llm"]["cache_hits"]
    assert simulate["requests"] == sent == simulate["cached"]
    assert "fraction" in metrics["beats_baselines_easy"]
