"""report.md / summary.csv / metrics.json / plots from small synthetic artifacts."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from head_explain import config
from head_explain.artifacts import read_parquet, write_json, write_jsonl, write_parquet
from head_explain.escaping import md_escape, render_excerpt
from head_explain.runners.report import write_report

NASTY = "| <script>alert(1)</script> ** [x](y) `code` _u_ # h\nsecond line"
META = {"model": "gpt2", "config_hash": "0"}


def write_artifacts(outdir: Path, clusters: bool = True) -> None:
    """3 layers x 2 heads: one nasty explanation, one failed head, one unscored head."""
    ex, sc, hs, ev = [], [], [], []
    for layer in range(3):
        for head in range(2):
            i = layer * 2 + head
            failed = (layer, head) == (2, 1)
            text = NASTY if (layer, head) == (0, 0) else f"explanation {i} about commas"
            ex.append(
                {
                    "layer": layer, "head": head, "explanation": "" if failed else text,
                    "explainer_model": "gpt-4o-mini", "prompt_version": "v1",
                    "prompt_sha": "abc123", "prompt_tokens": 100, "completion_tokens": 10,
                    "latency_s": 0.5, "cost_usd": 0.001, "raw": text,
                    "error": "HTTP 500 | <b>bad</b>\nretry" if failed else None,
                }
            )  # fmt: skip
            score = np.nan if failed or (layer, head) == (1, 1) else 0.1 * i
            sc.append(
                {
                    "layer": layer, "head": head, "score": score, "score_top": score,
                    "score_random": np.nan, "baseline_score": 0.01 * i,
                    "baseline_from": "L0H1", "method": "chat", "simulator_model": "sim-m",
                    "n_tokens": 100, "n_failed": 0,
                    "error": "parse failed" if (layer, head) == (1, 1) else None,
                }
            )  # fmt: skip
            hs.append(
                {
                    "layer": layer, "head": head, "mean_act": 1.0, "max_act": 3.0,
                    "bos_frac": 0.2, "mean_attn_dist": 4.0, "prev_token": 0.1,
                    "duplicate_token": 0.0, "induction": 0.0, "n_events": 50,
                }
            )  # fmt: skip
            for rank in range(4):
                ev.append(
                    {
                        "layer": layer, "head": head, "window_id": rank, "pos": 5,
                        "act": 2.0 - rank, "split": "explain", "rank": rank,
                        "src_pos": [1, 3, 0], "src_attn": [0.5, 0.3, 0.1],
                        "src_write": [1.0, 0.5, 0.2],
                        "excerpt_tokens": ["def", " <i>", " f", "(", "|x*", "):\n", " ret"],
                        "excerpt_dest": 5, "excerpt_src": [1, 3], "act_norm": 10.0 - rank,
                    }
                )  # fmt: skip
    write_jsonl(outdir / "explanations.jsonl", ex)
    write_parquet(outdir / "scores.parquet", pd.DataFrame(sc), {"stage": "simulate", **META})
    write_parquet(outdir / "head_stats.parquet", pd.DataFrame(hs), {"stage": "cache", **META})
    write_parquet(outdir / "events.parquet", pd.DataFrame(ev), {"stage": "select", **META})
    llm = {
        "requests": 6, "cache_hits": 2, "retries": 1, "failures": 1,
        "prompt_tokens": 600, "completion_tokens": 60, "cost_usd": 0.006,
    }  # fmt: skip
    for stage, secs in {"sample": 1.0, "cache": 2.0, "select": 0.5, "cluster": 0.3}.items():
        write_json(outdir / "metrics" / f"{stage}.json", {"stage": stage, "seconds": secs})
    for stage in ("explain", "simulate"):
        write_json(
            outdir / "metrics" / f"{stage}.json",
            {"stage": stage, "seconds": 3.0, "llm": llm, "model": "gpt-4o-mini"},
        )
    if clusters:
        write_json(
            outdir / "clusters.json",
            {
                "params": {"embedding_model": "m", "min_cluster_size": 2, "n_heads": 6,
                           "n_embedded": 5},
                "clusters": [
                    {"id": 0, "label": "commas, <img src=x>, *star*", "size": 2,
                     "mean_score": 0.25, "representative": "L1H0", "members": ["L1H0", "L0H1"]},
                    {"id": 1, "label": "other", "size": 2, "mean_score": None,
                     "representative": "L1H1", "members": ["L1H1", "L2H0"]},
                ],
                "noise": ["L0H0"],
                "failed": ["L2H1"],
                "note": "HDBSCAN over 5 explained heads",
            },
        )  # fmt: skip


@pytest.fixture
def report(tmp_path):
    write_artifacts(tmp_path)
    cfg = config.build({"outdir": str(tmp_path)})
    metrics = write_report(cfg, wall_times={"report": 0.2})
    return tmp_path, metrics, (tmp_path / "report.md").read_text()


def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_md_escape_is_inert():
    s = md_escape(NASTY)
    assert "\n" not in s and "<" not in s and ">" not in s
    assert "\\|" in s and "\\[x\\](y)" in s and "\\*\\*" in s and "\\`code\\`" in s
    assert md_escape("- item").startswith("\\-") and md_escape("1. x").startswith("1\\.")
    assert md_escape("a&b") == "a&amp;b"
    assert md_escape(None) == "" and md_escape("x" * 50, max_len=10).endswith("…")


def test_excerpt_marks_dest_and_sources():
    out = render_excerpt(["def", " <i>", " f", "(", "|x*", "):\n", " ret"], 5, [1, 3])
    assert out == "def \\[\\[&lt;i&gt;\\]\\] f\\[\\[(\\]\\]\\|x\\*<b>):↵</b> ret"
    assert render_excerpt(["a", " ", "b"], 1, []) == "a<b>␣</b>b"


def test_report_renders_safely(report):
    outdir, _, md = report
    assert "<script" not in md and "<img" not in md and "<i>" not in md
    assert "[x](y)" not in md
    # every table row keeps its column count whatever the cell text holds
    for block in re.findall(r"((?:^\|.*\n)+)", md, flags=re.M):
        counts = {_unescaped_pipes(line) for line in block.splitlines()}
        assert len(counts) == 1, block
    # the only raw HTML is the markup the report itself adds
    assert set(re.findall(r"</?([a-zA-Z]+)", md)) <= {"b"}
    for line in md.splitlines():
        assert not line.startswith("second line")
    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    assert "<script" not in html and "<a " not in html and "<em>" not in html
    assert "<code>" not in html and "<del>" not in html
    assert re.findall(r'<img src="([^"]+)"', html) == [
        "plots/score_hist.png",
        "plots/score_map.png",
    ]
    assert "&lt;script&gt;" in html and "[x](y)" in html  # shown literally
    # settings, explained heads, llm usage, wall times, distribution, layers, failed heads
    assert html.count("<table>") == md.count("\n|---|") == 7


def test_report_contents(report):
    outdir, metrics, md = report
    assert "| model | gpt2 |" in md and "| explainer | gpt-4o-mini |" in md
    assert "| simulator | sim-m |" in md and "| method | chat (6) |" in md
    assert "| report | 0.2 |" in md and "| explain | 3.0 |" in md
    assert "n/a" in md  # NaN score of L1H1 and score_random
    assert "#### L1H1" not in md  # unscored heads are neither best nor worst
    assert "### Cluster 0: commas, &lt;img src=x&gt;, \\*star\\*" in md
    assert "mean score n/a" in md  # cluster 1 has no finite scores
    assert "<b>):↵</b>" in md and "act 10.0" in md and "(+1 source(s) before the excerpt)" in md
    failed = md[md.index("## Failed heads") :]
    assert "L2H1" in failed and "HTTP 500" in failed and "L1H1" in failed
    assert "parse failed" in failed
    assert "![score histogram" in md and "](plots/score_map.png)" in md
    for name in ("score_map.png", "score_hist.png"):
        data = (outdir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_summary_and_metrics(report):
    outdir, metrics, _ = report
    rows = list(csv.DictReader((outdir / "summary.csv").open()))
    assert len(rows) == 6
    assert [r["head"] for r in rows] == ["L0H0", "L0H1", "L1H0", "L1H1", "L2H0", "L2H1"]
    first = rows[0]
    assert first["explanation"] == NASTY  # CSV keeps the raw text, quoted
    for col in ("layer", "head_index", "score_top", "baseline_score", "cluster", "induction"):
        assert col in first
    assert {r["head"]: r["cluster"] for r in rows}["L0H1"] == "0"
    assert first["cluster"] == "-1"
    assert rows[5]["error"].startswith("explain: HTTP 500")
    assert rows[3]["error"] == "simulate: parse failed"
    assert rows[2]["error"] == ""

    text = (outdir / "metrics.json").read_text()
    assert "NaN" not in text
    m = json.loads(text)
    assert m == {k: v for k, v in metrics.items() if k != "detail"}
    assert m["analysed"] == 6 and m["explained"] == 5 and m["scored"] == 4 and m["failed"] == 2
    assert math.isclose(m["score"], np.mean([0.0, 0.1, 0.2, 0.4]))
    # the baseline is averaged over the same 4 heads as the score, not over all 6
    assert m["paired"] == 4
    assert math.isclose(m["baseline"], np.mean([0.0, 0.01, 0.02, 0.04]), abs_tol=1e-4)
    assert math.isclose(m["lift"], np.mean([0.0, 0.09, 0.18, 0.36]), abs_tol=1e-4)
    assert m["lift_lo"] <= m["lift"] <= m["lift_hi"] and m["above"] == 0.75
    assert m["requests"] == 12 and m["tokens"] == 1320 and math.isclose(m["cost_usd"], 0.012)
    assert not any(k.startswith(("auc_", "tmpl_")) for k in m)  # no pair scoring here
    d = metrics["detail"]
    assert d["n_clusters"] == 2 and math.isclose(d["noise_fraction"], 1 / 5)
    assert math.isclose(d["frac_above_0_5"], 0.0) and d["llm_cache_hits"] == 4
    assert d["paired"]["n_missing"] == 2
    assert sorted(d["no_score_reasons"].values()) == [1, 1]
    assert "simulate: parse failed" in d["no_score_reasons"]
    plot_rows = list(csv.DictReader((outdir / "plot_data" / "head_scores.csv").open()))
    assert list(plot_rows[0]) == ["head", "position", "score", "baseline"]
    assert len(plot_rows) == 6 and plot_rows[5]["position"] == "2.5000"
    hist = list(csv.DictReader((outdir / "plot_data" / "score_hist.csv").open()))
    assert sum(int(r["explanation"]) for r in hist) == 4
    assert sum(int(r["baseline"]) for r in hist) == 6
    layers = list(csv.DictReader((outdir / "plot_data" / "layer_means.csv").open()))
    assert [r["layer"] for r in layers] == ["0", "1", "2"]


def test_no_clusters_no_scores(tmp_path):
    """Everything failed and the cluster stage never ran: still a report, nulls, no NaN."""
    write_artifacts(tmp_path, clusters=False)
    from head_explain.artifacts import read_parquet

    sc, meta = read_parquet(tmp_path / "scores.parquet")
    sc["score"] = np.nan
    sc["baseline_score"] = np.nan
    write_parquet(tmp_path / "scores.parquet", sc, meta)
    (tmp_path / "events.parquet").unlink()
    cfg = config.build({"outdir": str(tmp_path)})
    m = write_report(cfg)
    md = (tmp_path / "report.md").read_text()
    assert m["score"] is None and m["scored"] == 0 and m["detail"]["n_clusters"] is None
    assert m["lift"] is None and m["paired"] == 0
    assert "no comparison with the shuffled baseline" in md
    assert "NaN" not in (tmp_path / "metrics.json").read_text()
    assert "run the `cluster` stage" in md and "No head has a finite score." in md
    assert (tmp_path / "plots" / "score_hist.png").exists()


def test_empty_cluster_list(tmp_path):
    write_artifacts(tmp_path)
    data = json.loads((tmp_path / "clusters.json").read_text())
    data.update(clusters=[], noise=["L0H0", "L0H1"], note="2 head(s), fewer than 5")
    write_json(tmp_path / "clusters.json", data)
    m = write_report(config.build({"outdir": str(tmp_path)}))
    md = (tmp_path / "report.md").read_text()
    assert m["detail"]["n_clusters"] == 0
    assert "No clusters were found." in md and "Noise (2): L0H0, L0H1" in md


def test_duplicate_head_rows_keep_the_latest(tmp_path):
    """A resumed explain stage may append a retry for a head: one summary row, the last."""
    write_artifacts(tmp_path)
    path = tmp_path / "explanations.jsonl"
    retry = {"layer": 0, "head": 1, "explanation": "retried text", "error": None}
    path.write_text(path.read_text() + json.dumps(retry) + "\n")
    write_report(config.build({"outdir": str(tmp_path)}))
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 6
    assert [r["explanation"] for r in rows if r["head"] == "L0H1"] == ["retried text"]


def test_head_without_baseline_is_left_out_and_named(tmp_path):
    """A scored head with no partner has no baseline: not paired, its reason shown."""
    write_artifacts(tmp_path)
    from head_explain.artifacts import read_parquet

    sc, meta = read_parquet(tmp_path / "scores.parquet")
    sc["baseline_error"] = None
    sc.loc[0, ["baseline_score", "baseline_from", "baseline_error"]] = (
        np.nan, "", "no baseline: no other explained head to borrow an explanation from",
    )  # fmt: skip
    write_parquet(tmp_path / "scores.parquet", sc, meta)
    m = write_report(config.build({"outdir": str(tmp_path)}))
    md = (tmp_path / "report.md").read_text()
    assert m["scored"] == 4 and m["paired"] == 3
    assert math.isclose(m["baseline"], np.mean([0.01, 0.02, 0.04]), abs_tol=1e-4)
    assert m["detail"]["no_baseline_reasons"] == {
        "no baseline: no other explained head to borrow an explanation from": 1
    }
    assert "on the same 3 heads" in md and "Scored without a baseline (1): L0H0 (no baseline" in md
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert rows[0]["baseline_note"].startswith("no baseline")


def test_head_aware_sections(tmp_path):
    """Every head's class, pair-AUCs over the same heads with both baselines, one row per
    explained head, and the evidence line beside a best/worst head."""
    write_artifacts(tmp_path)
    sc, meta = read_parquet(tmp_path / "scores.parquet")
    sc["head_class"] = ["previous_token", "self", "induction", "content", "bos_sink", "self"]
    sc["pair_auc_easy"] = [0.9, 0.8, 0.7, np.nan, 0.6, np.nan]  # L1H1: too few pairs
    sc["template_auc_easy"] = [1.0, 0.7, 0.8, np.nan, 0.5, np.nan]
    sc["shuffled_auc_easy"] = [0.5, 0.6, np.nan, np.nan, 0.4, np.nan]  # L1H0: no partner
    for col in ("pair_auc_hard", "template_auc_hard", "shuffled_auc_hard"):
        sc[col] = np.nan
    sc["lift_easy"] = sc["pair_auc_easy"] - sc["template_auc_easy"]
    sc["lift_hard"] = np.nan
    write_parquet(tmp_path / "scores.parquet", sc, meta)
    types = pd.DataFrame(
        [{"layer": a, "head": b, "head_name": f"L{a}H{b}", "class_score": 0.5 + 0.05 * (2 * a + b),
          "head_class": ["previous_token", "self", "induction", "content"][(2 * a + b) % 4],
          "second_class": ""} for a in range(3) for b in range(2)]
    )  # fmt: skip
    write_parquet(tmp_path / "head_types.parquet", types, {"stage": "head_types", **META})
    metrics = write_report(config.build({"outdir": str(tmp_path)}))
    md = (tmp_path / "report.md").read_text()
    assert "All 6 heads of the model" in md
    assert "| previous\\_token | 2 | 33% | 2 | L2H0 (0.70) |" in md  # L0H0, L2H0
    assert "| content | 1 | 17% | 1 | L1H1 (0.65) |" in md
    assert "| fixed\\_offset | 0 | 0% | 0 | — |" in md
    # the three means over the same 3 heads (L0H0, L0H1, L2H0)
    pairs = md[md.index("## Pair scores") :]
    row = next(x for x in pairs.splitlines() if x.startswith("| easy negatives"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "3" and cells[2:5] == ["0.767", "0.733", "0.500"], cells
    assert metrics["pairs_easy"] == 3 and metrics["auc_easy"] == pytest.approx(0.7667, abs=1e-4)
    assert metrics["shuf_easy"] == pytest.approx(0.5)
    assert metrics["tmpl_easy"] == pytest.approx(0.7333, abs=1e-4)
    assert "1 explained head(s) have no easy pair-AUC" in pairs
    table = md[md.index("## Explained heads") : md.index("## Cost and time")]
    assert "| L0H0 | previous\\_token |" in table and "L2H1" not in table  # failed: no row
    assert "#### L2H0 (bos\\_sink): score 0.400" in md  # the best head, with its class
