"""sample -> cache -> select on the real corpora in ../shared/data (skips when absent)."""

from __future__ import annotations

import pandas as pd
import pytest

from head_explain.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

BASE = [
    "--model", "smollm2-135m-instruct", "--windows", "24", "--window-len", "48",
    "--heads", "L17H5,L3H1", "--topk", "8", "--candidates", "16", "--random-windows", "4",
    "--explain-examples", "3", "--score-top-examples", "1", "--score-random-examples", "1",
    "--excerpt-len", "8", "--until", "select",
]  # fmt: skip


@pytest.mark.parametrize(
    "source_args, source, doc_prefix",
    [
        (["--sources", "wikitext", "--wikitext-dir", "{data}/wikitext",
          "--wikitext-config", "wikitext-2-raw-v1", "--wikitext-split", "test"], "wikitext", ""),
        (["--sources", "stackexchange", "--stackexchange-dir", "{data}/stackexchange/out"],
         "stackexchange", "coffee.stackexchange/"),
    ],
)  # fmt: skip
def test_real_corpus_through_select(shared_data, tmp_path, source_args, source, doc_prefix):
    args = [a.replace("{data}", str(shared_data)) for a in source_args]
    assert main([*BASE, *args, "--outdir", str(tmp_path)]) == 0
    windows = pd.read_parquet(tmp_path / "windows.parquet")
    assert len(windows) == 24 and set(windows["source"]) == {source}
    assert windows["doc_id"].str.startswith(doc_prefix).all()
    raw = pd.read_parquet(tmp_path / "raw_events.parquet")
    assert set(map(tuple, raw[["layer", "head"]].drop_duplicates().to_numpy())) == {(17, 5), (3, 1)}
    events = pd.read_parquet(tmp_path / "events.parquet")
    assert set(events["split"]) == {"explain", "score_top", "score_random"}
    for r in events.itertuples():
        assert r.excerpt_tokens[r.excerpt_dest] != ""
