"""The HTML head browser: escaping and data building (fast), then real headless
Chromium on a browser built from the bundled model's artifacts (slow)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from head_explain.artifacts import read_parquet, write_json, write_jsonl, write_parquet
from head_explain.browser import build_browser, render_to, write_browser
from head_explain.browser.data import excerpt_rows, index_data
from head_explain.browser.page import clean, render_page, script_json

INJECTIONS = [
    "<script>window.__pwned=1</script>",
    '"><img src=x onerror="window.__pwned=1">',
    "](javascript:window.__pwned=1)",
    "</script><script>window.__pwned=1</script>",
    "<!-- \u2028\u2029 &amp; ",
]
CLASSES = ["previous_token", "induction", "duplicate_token", "self", "bos_sink", "content"]


# ---------------------------------------------------------------- unit: escaping
def test_script_json_is_inert_in_a_script_block_and_round_trips():
    data = {"tokens": INJECTIONS, "x": 1.5}
    text = script_json(data)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert json.loads(text) == data


def test_clean_rounds_and_nulls_non_finite_numbers():
    got = clean({"a": np.float32(0.123456), "b": float("nan"), "c": np.arange(2), "d": [math.inf],
                 "e": pd.NA, "f": np.bool_(True), 3: "x"})  # fmt: skip
    assert got == {"a": 0.1235, "b": None, "c": [0, 1], "d": [None], "e": None, "f": True, "3": "x"}


def test_page_admits_only_its_own_script_by_hash():
    html = render_page("t </title><script>", "index", {"heads": [], "s": INJECTIONS})
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    assert len(scripts) == 1  # the data block is type=application/json, not executable
    want = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{want}'" in html
    assert "unsafe-inline'; img" not in html.split("script-src")[1].split(";")[0]
    assert "<title>t &lt;/title&gt;&lt;script&gt;</title>" in html
    block = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert json.loads(block.group(1))["s"] == INJECTIONS


# ---------------------------------------------------------------- unit: data
def _types(n_layers: int, n_heads: int) -> pd.DataFrame:
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            i = layer * n_heads + head
            rows.append(
                dict(
                    layer=layer, head=head, head_name=f"L{layer}H{head}",
                    head_class=CLASSES[i % len(CLASSES)], class_score=0.5 + 0.01 * (i % 40),
                    second_class=CLASSES[(i + 1) % len(CLASSES)] if i % 3 == 0 else None,
                    syn_prev_token=(i % 7) / 7, nat_prev_token=(i % 5) / 5, nat_self=(i % 3) / 3,
                )
            )  # fmt: skip
    return pd.DataFrame(rows)


def test_index_covers_every_head_and_derives_the_lift():
    scores = pd.DataFrame(
        [dict(layer=1, head=2, score=0.4, baseline_score=0.1, pair_auc_easy=0.9,
              template_auc_easy=0.7, error=None)]
    )  # fmt: skip
    inputs = {"head_types": _types(2, 3), "scores": scores, "explanations": [
        {"layer": 1, "head": 2, "explanation": "reads the previous token", "error": None},
        {"layer": 0, "head": 0, "explanation": "", "error": "timeout"},
    ]}  # fmt: skip
    idx = index_data(inputs, pages={"L1H2"})
    assert (idx["n_layers"], idx["n_heads"], len(idx["heads"])) == (2, 3, 6)
    h = idx["heads"][1 * 3 + 2]
    assert h["name"] == "L1H2" and h["page"] == "heads/L1H2.html"
    assert h["scores"]["lift_easy"] == pytest.approx(0.2)
    assert h["explanation"] == "reads the previous token"
    assert "explanation" not in idx["heads"][0]  # a failed explanation is not shown as one
    assert idx["has"]["lift"] and idx["has"]["types"] and not idx["has"]["clusters"]
    assert idx["classes"] == sorted(CLASSES)


def test_grid_without_head_types_comes_from_what_was_seen():
    stats = pd.DataFrame([dict(layer=3, head=1, mean_act=1.0), dict(layer=0, head=4, mean_act=2.0)])
    files = build_browser({"head_stats": stats})
    assert list(files) == ["index.html"]  # no events or explanations: no head pages
    data = json.loads(re.search(r'id="data">(.*?)</script>', files["index.html"], re.S).group(1))
    assert (data["n_layers"], data["n_heads"]) == (4, 5)
    assert data["heads"][3 * 5 + 1]["stats"]["mean_act"] == 1.0


def test_excerpt_rows_align_sources_and_simulated_values():
    ev = pd.DataFrame(
        [dict(layer=0, head=0, window_id=7, pos=12, act=2.0, split="score_top", rank=0,
              excerpt_start=10, excerpt_tokens=["a", "b", "c", "d"], excerpt_dest=2,
              excerpt_acts=[0.1, 0.5, 2.0, 0.0], src_pos=[11, 3, 12], src_attn=[0.6, 0.3, 0.1],
              act_norm=10.0)]
    )  # fmt: skip
    rows = excerpt_rows(ev, {"score_top:0": [1.0, float("nan"), 9.0, 0.0]})
    (r,) = rows
    assert r["srcs"] == [{"i": 1, "w": 0.6}, {"i": 2, "w": 0.1}] and r["srcs_before"] == 1
    assert r["sim"] == [1.0, None, 9.0, 0.0] and r["key"] == "score_top:0"


def test_write_browser_swaps_the_folder_in_whole(tmp_path):
    write_browser(tmp_path, {"index.html": "one", "heads/L0H0.html": "x"})
    target = write_browser(tmp_path, {"index.html": "two"})
    assert sorted(p.name for p in target.rglob("*")) == ["index.html"]
    assert (target / "index.html").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["browser"]  # no temp folder left


# ---------------------------------------------------------------- real Chromium
@pytest.fixture(scope="module")
def chromium_binary():
    from chromium import ensure_chromium

    binary, why = ensure_chromium()
    if not binary:
        pytest.skip(f"no headless Chromium: {why}")
    return binary


def _decorate(out: Path) -> None:
    """Add what the LLM stages and head typing would write, with injection strings in
    explanations and in corpus tokens, to the real sample/cache/select artifacts."""
    events, meta = read_parquet(out / "events.parquet")
    for first in events.index[(events["split"] == "explain") & (events["rank"] == 0)]:
        toks = list(events.at[first, "excerpt_tokens"])
        toks[: len(INJECTIONS)] = INJECTIONS
        events.at[first, "excerpt_tokens"] = toks
    write_parquet(out / "events.parquet", events, meta)
    heads = sorted({(int(a), int(b)) for a, b in events[["layer", "head"]].itertuples(index=False)})
    write_jsonl(out / "explanations.jsonl", [
        {"layer": la, "head": he, "explanation": f"attends to the previous token {INJECTIONS[i]}",
         "explainer_model": "hand-written", "prompt_version": "explain_v1", "error": None}
        for i, (la, he) in enumerate(heads)
    ])  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    for la, he in heads:
        sc = events[(events["layer"] == la) & (events["head"] == he)]
        sc = sc[sc["split"] != "explain"].sort_values(["split", "rank"])
        rows.append(dict(
            layer=la, head=he, score=0.3, score_top=0.4, score_random=0.1, baseline_score=0.05,
            baseline_from="L0H0", method="echo", simulator_model="hand-written", n_tokens=10,
            n_failed=0, error=None, pair_auc_easy=0.85, pair_auc_hard=0.6,
            template_auc_easy=0.8, template_auc_hard=0.62, shuffled_auc_easy=0.5,
            clause_auc_easy=0.7, clause_auc_hard=0.55, added_easy=0.15, added_hard=0.05,
            template_sentence=f"This head attends to the previous token. {INJECTIONS[1]}",
            sim_events=[f"{s}:{r}" for s, r in zip(sc["split"], sc["rank"], strict=True)],
            sim_acts=[rng.uniform(0, 10, len(t)).round(2).tolist() for t in sc["excerpt_tokens"]],
        ))  # fmt: skip
    write_parquet(out / "scores.parquet", pd.DataFrame(rows), {"model": meta.get("model", "")})
    write_parquet(out / "head_types.parquet", _types(30, 9), {"model": meta.get("model", "")})
    names = [f"L{la}H{he}" for la, he in heads]
    write_json(out / "clusters.json", {"clusters": [{"id": 0, "label": INJECTIONS[3], "size": 2,
               "mean_score": 0.3, "representative": names[0], "members": names}], "noise": []})  # fmt: skip


@pytest.fixture(scope="module")
def built_browser(tiny_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("browser") / "outputs"
    shutil.copytree(tiny_artifacts, out)
    _decorate(out)
    metrics = render_to(out, model="smollm2-135m-instruct")
    return out / "browser", metrics


@pytest.mark.slow
def test_browser_files_and_budget(built_browser):
    folder, metrics = built_browser
    assert sorted(p.name for p in (folder / "heads").iterdir()) == ["L17H5.html", "L8H7.html"]
    assert "browser_note_patterns" not in metrics and "browser_note_neighbours" not in metrics
    assert metrics["browser_bytes"] < 10_000_000
    page = (folder / "heads" / "L17H5.html").read_text()
    assert "<img" not in page and "</script><script>window" not in page


@pytest.mark.slow
def test_index_in_chromium(built_browser, chromium_binary, tmp_path):
    from chromium import Chromium

    folder, _ = built_browser
    b = Chromium(chromium_binary)
    try:
        # Best of three loads: the budget is for the page, not for a busy shared CPU.
        loads = []
        for _ in range(3):
            b.open((folder / "index.html").as_uri())
            loads.append(b.eval("performance.getEntriesByType('navigation')[0].loadEventEnd"))
        assert min(loads) < 2000, f"index took {min(loads):.0f} ms to load (best of 3)"
        assert b.eval("document.querySelectorAll('.cell').length") == 270
        assert b.eval("document.querySelectorAll('.cell.page').length") == 2
        assert (
            b.eval("document.querySelectorAll('#heads-table tbody tr, #heads-table tr').length")
            == 3
        )
        b.hover('.cell[data-head="L17H5"]')
        tip = b.eval("document.getElementById('tip').innerText")
        assert "L17H5" in tip and "pair AUC" in tip and INJECTIONS[1] in tip, tip
        for mode in ("score", "lift", "cluster", "class"):
            b.eval(f"document.querySelector('[data-mode={mode}]').click()")
        b.eval("const s = document.getElementById('search'); s.value = 'attends to the previous';"
               "s.dispatchEvent(new Event('input'))")  # fmt: skip
        assert b.eval("document.getElementById('count').textContent").startswith("2 of 270")
        text = b.eval("document.body.innerText")
        assert "[object " not in text and "undefined" not in text and "NaN" not in text
        b.screenshot(tmp_path / "index.png")
        assert b.eval("document.querySelectorAll('img').length") == 0
        assert b.eval("document.scripts.length") == 2
        assert b.eval("window.__pwned === undefined")
        b.eval("document.querySelector('.cell[data-head=L0H1]').click()")  # classified only
        side = b.eval("document.querySelector('.side').innerText")
        assert "L0H1" in side and "head_class" in side and "syn_prev_token" in side
        assert b.errors() == [] and b.dialogs() == []
        url = b.click_and_wait(".cell[data-head=L17H5]")  # a click opens the head page
        assert url.endswith("/heads/L17H5.html") and b.eval("document.title").startswith("L17H5")
        assert b.errors() == []
    finally:
        b.close()
    assert (tmp_path / "index.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_head_page_in_chromium(built_browser, chromium_binary, tmp_path):
    from chromium import Chromium

    folder, _ = built_browser
    b = Chromium(chromium_binary)
    try:
        b.open((folder / "heads" / "L17H5.html").as_uri())
        text = b.eval("document.body.innerText")
        for s in INJECTIONS[:4]:
            assert s in text  # shown as text, in tokens and explanations alike
        assert "[object " not in text and "undefined" not in text and "NaN" not in text
        # what the explainer added over the measured clause alone, in the scores card
        card = b.eval("document.getElementById('scores').innerText")
        assert "measured clause alone: pair AUC 0.700 easy" in card and "+0.150" in card, card
        b.hover(".excerpt .tok.dest")
        tip = b.eval("document.getElementById('tip').innerText")
        assert re.search(r"activation \d+\.\d{3}", tip) and "reads:" in tip
        assert b.eval("getComputedStyle(document.getElementById('tip')).display") == "block"
        n = b.eval("document.querySelector('#pattern .pat').style.gridTemplateColumns")
        n_tok = int(re.search(r"repeat\((\d+)", n).group(1))
        assert b.eval("document.querySelectorAll('#pattern .px').length") == n_tok * n_tok
        assert b.eval("document.querySelectorAll('.tok.sim').length") > 0
        assert "L8H7" in b.eval("document.getElementById('neighbours').innerText")
        b.screenshot(tmp_path / "head.png")
        assert b.eval("document.querySelectorAll('img').length") == 0
        assert b.eval("document.scripts.length") == 2
        assert b.eval("window.__pwned === undefined")
        assert b.errors() == [] and b.dialogs() == []
    finally:
        b.close()
    assert (tmp_path / "head.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_run_stopped_after_cache_still_gets_its_grid(tiny_artifacts, tmp_path):
    out = tmp_path / "outputs"
    shutil.copytree(tiny_artifacts, out)
    (out / "events.parquet").unlink()
    (out / "head_stats.parquet").write_text("not parquet")  # unreadable: skipped, not fatal
    metrics = render_to(out, neighbours=False)
    assert metrics["browser_head_pages"] == 0
    html = (out / "browser" / "index.html").read_text()
    data = json.loads(re.search(r'id="data">(.*?)</script>', html, re.S).group(1))
    assert (data["n_layers"], data["n_heads"]) == (30, 9)  # from the cache stage's metrics


@pytest.mark.slow
def test_excerpt_patterns_match_hf_eager_attentions(smol_bridge, smol_tokenizer):
    """The heat map's rows equal HF eager `output_attentions`, not our own hooks."""
    import torch
    from transformers import AutoModelForCausalLM

    from head_explain.browser.patterns import excerpt_patterns
    from head_explain.models import bundled_hf_dir

    texts = ["The cat sat on the mat. The cat sat on the mat again, and the dog",
             "def f(x):\n    return (x + 1) * (x - 1)\n\nprint(f(3), f(4))"]  # fmt: skip
    tokens = [[smol_tokenizer.bos_token_id, *smol_tokenizer(t).input_ids[:15]] for t in texts]
    windows = pd.DataFrame({"window_id": [10, 11], "tokens": tokens})
    ev = dict(split="explain", excerpt_start=3, excerpt_end=14)
    events = pd.DataFrame([
        dict(layer=3, head=2, window_id=10, rank=0, **ev),
        dict(layer=3, head=2, window_id=11, rank=1, **ev),  # not the first: not drawn
        dict(layer=17, head=5, window_id=11, rank=0, **ev),
        dict(layer=17, head=5, window_id=10, rank=0, **(ev | {"split": "score_top"})),
    ])  # fmt: skip
    got = excerpt_patterns(smol_bridge, windows, events, batch_size=1)
    assert [(r.layer, r.head, r.window_id) for r in got.itertuples()] == [(3, 2, 10), (17, 5, 11)]
    hf = AutoModelForCausalLM.from_pretrained(
        bundled_hf_dir(), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        att = hf(torch.tensor(tokens), output_attentions=True).attentions
    for r in got.itertuples():
        ref = att[r.layer][r.window_id - 10, r.head, 3:14, 3:14].numpy()
        np.testing.assert_allclose(np.stack(r.rows), ref, atol=2e-4)
