"""The window sampler on small real-English corpora built from CPython's help topics."""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pandas as pd
import pytest

from head_explain.config import Config
from head_explain.data import iter_documents
from head_explain.data.window_shares import max_balanced_windows, source_shares
from head_explain.data.windows import (
    COLUMNS,
    doc_priority,
    sample_windows,
    scan_source,
)
from head_explain.errors import ConfigError, DataError
from head_explain.models import bos_id

TOPICS = sorted(topics)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """files: 60 help topics as jsonl; stackexchange: 19 others in a zip."""
    root = tmp_path_factory.mktemp("corpus")
    jsonl = root / "topics.jsonl"
    jsonl.write_text("".join(json.dumps({"text": topics[t]}) + "\n" for t in TOPICS[:60]))
    out = root / "out"
    out.mkdir()
    with zipfile.ZipFile(out / "python.stackexchange.zip", "w") as zf:
        for i, t in enumerate(TOPICS[60:]):
            zf.writestr(f"python.stackexchange_{i:010d}.txt", f"Q:\n\n{t}\n\n{topics[t]}")
    return {"jsonl": jsonl, "out": out}


def cfg_for(corpus: dict[str, Path], **kw) -> Config:
    base = {
        "sources": "files",
        "data_files": str(corpus["jsonl"]),
        "stackexchange_dir": str(corpus["out"]),
        "windows": 40,
        "window_len": 64,
    }
    return Config(**{**base, **kw})


def doc_texts(cfg: Config) -> dict[tuple[str, str], str]:
    from head_explain.config import source_list

    return {(d.source, d.doc_id): d.text for s in source_list(cfg) for d in iter_documents(cfg, s)}


def as_tuples(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(tokens=df.tokens.map(lambda t: tuple(int(x) for x in t)))


def test_columns_types_lengths_and_bos(corpus, smol_tokenizer) -> None:
    bos = bos_id(smol_tokenizer)
    df = sample_windows(cfg_for(corpus), smol_tokenizer, bos)
    assert list(df.columns) == COLUMNS
    assert len(df) == 40
    assert df.window_id.dtype == np.int64 and list(df.window_id) == list(range(40))
    assert df.char_start.dtype == np.int64 and df.char_end.dtype == np.int64
    assert all(isinstance(x, str) for x in df.source) and set(df.source) == {"files"}
    assert all(isinstance(x, str) for x in df.doc_id)
    for t in df.tokens:
        assert isinstance(t, np.ndarray) and t.dtype == np.int32 and len(t) == 64
        assert t[0] == bos and bos not in t[1:]
    keys = list(zip(df.source, df.doc_id, df.char_start, strict=True))
    assert keys == sorted(keys)


def test_text_is_the_span_the_tokens_cover(corpus, smol_tokenizer) -> None:
    cfg = cfg_for(corpus, windows=60, window_len=96)
    df = sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    texts = doc_texts(cfg)
    same = decoded = 0
    for row in df.itertuples():
        assert row.text == texts[(row.source, row.doc_id)][row.char_start : row.char_end]
        assert 0 <= row.char_start < row.char_end
        ids = smol_tokenizer(row.text, add_special_tokens=False)["input_ids"]
        same += list(ids) == row.tokens[1:].tolist()
        decoded += smol_tokenizer.decode(row.tokens[1:].tolist()) == row.text
    assert same >= 0.9 * len(df)  # BPE merges at the cut may differ once in a while
    assert decoded >= 0.9 * len(df)


def test_same_seed_same_frame_other_seed_other_sample(corpus, smol_tokenizer) -> None:
    bos = bos_id(smol_tokenizer)
    a = sample_windows(cfg_for(corpus, seed=3), smol_tokenizer, bos)
    b = sample_windows(cfg_for(corpus, seed=3), smol_tokenizer, bos)
    pd.testing.assert_frame_equal(as_tuples(a), as_tuples(b))
    c = sample_windows(cfg_for(corpus, seed=4), smol_tokenizer, bos)
    assert set(zip(a.doc_id, a.char_start, strict=True)) != set(
        zip(c.doc_id, c.char_start, strict=True)
    )


def test_one_window_per_doc_first_then_more_without_overlap(corpus, smol_tokenizer) -> None:
    bos = bos_id(smol_tokenizer)
    few = sample_windows(cfg_for(corpus, windows=30), smol_tokenizer, bos)
    assert few.doc_id.is_unique  # 60 docs are enough for one window each
    many = sample_windows(cfg_for(corpus, windows=300), smol_tokenizer, bos)
    assert not many.doc_id.is_unique
    for _, g in many.groupby("doc_id"):
        assert (g.char_end.to_numpy()[:-1] <= g.char_start.to_numpy()[1:]).all()


def test_no_duplicate_windows(tmp_path, smol_tokenizer) -> None:
    """Five copies of a document exactly one window long add one window, not five."""
    ids = smol_tokenizer(topics["if"], add_special_tokens=False)["input_ids"][:31]
    text = smol_tokenizer.decode(ids)
    assert len(smol_tokenizer(text, add_special_tokens=False)["input_ids"]) == 31

    def capacity(copies: int) -> int:
        jsonl = tmp_path / f"dups{copies}.jsonl"
        rows = [text] * copies + [topics["while"]]
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        cfg = Config(sources="files", data_files=str(jsonl), windows=10_000, window_len=32)
        with pytest.raises(DataError) as err:
            sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
        return int(re.search(r"give only (\d+)", str(err.value)).group(1))

    assert capacity(5) == capacity(1) == capacity(0) + 1
    jsonl = tmp_path / "dups5.jsonl"
    cfg = Config(sources="files", data_files=str(jsonl), windows=capacity(5), window_len=32)
    df = sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    assert len({tuple(t) for t in df.tokens}) == len(df)
    assert sum(df.doc_id.str.endswith((":1", ":2", ":3", ":4", ":5"))) == 1


def test_balanced_across_two_sources(corpus, smol_tokenizer) -> None:
    cfg = cfg_for(corpus, sources="files,stackexchange", windows=21)
    df = sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    assert df.source.value_counts().to_dict() == {"files": 11, "stackexchange": 10}
    assert list(df.source) == sorted(df.source)
    assert all(
        d.startswith("python.stackexchange/") for d in df.doc_id[df.source == "stackexchange"]
    )
    assert source_shares(21, 2) == [11, 10] and source_shares(7, 3) == [3, 2, 2]


def test_too_small_corpus_names_key_value_and_limit(corpus, smol_tokenizer) -> None:
    cfg = cfg_for(corpus, windows=100_000, window_len=192)
    with pytest.raises(DataError) as err:
        sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    msg = str(err.value)
    m = re.fullmatch(
        r"sources 'files' give only (\d+) windows of 192 tokens; lower 'windows' to at "
        r"most (\d+), lower 'window_len' or add sources",
        msg,
    )
    assert m and m.group(1) == m.group(2) and 100 < int(m.group(1)) < 100_000
    # The limit it names works.
    ok = sample_windows(
        cfg_for(corpus, windows=int(m.group(1)), window_len=192),
        smol_tokenizer,
        bos_id(smol_tokenizer),
    )
    assert len(ok) == int(m.group(1))


def test_short_source_among_several(corpus, smol_tokenizer) -> None:
    cfg = cfg_for(corpus, sources="files,stackexchange", windows=2000, window_len=128)
    with pytest.raises(DataError) as err:
        sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    msg = str(err.value)
    assert "source 'stackexchange' gives only" in msg and "its share of windows=2000" in msg
    assert re.search(r"lower 'windows' to at most \d+", msg)


def test_max_balanced_windows() -> None:
    assert max_balanced_windows(1, {0: 812}, 1500) == 812
    assert max_balanced_windows(2, {1: 300}, 1500) == 601  # shares 301 + 300
    assert max_balanced_windows(3, {0: 10, 2: 4}, 100) == 14  # shares 5, 5, 4


def test_without_bos_all_tokens_are_text(corpus, smol_tokenizer) -> None:
    df = sample_windows(cfg_for(corpus, windows=10), smol_tokenizer, None)
    assert all(len(t) == 64 for t in df.tokens)
    row = df.iloc[0]
    assert smol_tokenizer.decode(row.tokens.tolist()) == row.text


def test_scan_keeps_the_lowest_priorities(corpus) -> None:
    cfg = cfg_for(corpus, seed=7)
    kept, scanned, eligible = scan_source(cfg, "files", keep=10, min_bytes=63)
    assert scanned == 60 and len(kept) == 10
    prio = sorted(
        (doc_priority(7, "files", d.doc_id), d.doc_id)
        for d in iter_documents(cfg, "files")
        if len(d.text.encode()) >= 63
    )
    assert eligible == len(prio)
    assert [d.doc_id for d in kept] == [i for _, i in prio[:10]]


def test_rescans_when_kept_docs_are_too_short(tmp_path, smol_tokenizer, caplog) -> None:
    """Long in bytes but short in tokens: the first heap holds no usable document."""
    short = ["-" * 300 + f" {i}" for i in range(150)]  # ~40 tokens: no 191-token window
    longest = sorted(topics, key=lambda t: len(topics[t]))[-2:]
    rows = short + [topics[t] for t in longest]
    jsonl = tmp_path / "short.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    long_ids = {f"{jsonl}:151", f"{jsonl}:152"}
    for seed in range(100):  # a seed whose first heap (2 * 2 + 64 docs) misses both
        cfg = Config(sources="files", data_files=str(jsonl), windows=2, window_len=192, seed=seed)
        kept, _, eligible = scan_source(cfg, "files", keep=2 * 2 + 64, min_bytes=191)
        if not long_ids & {d.doc_id for d in kept}:
            break
    assert eligible == 152 and len(kept) == 68
    with caplog.at_level(logging.INFO, logger="head_explain.data.windows"):
        df = sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    assert set(df.doc_id) <= long_ids and len(df) == 2
    assert "rescanning" in caplog.text


def test_logs_docs_windows_and_time(corpus, smol_tokenizer, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="head_explain.data.windows"):
        sample_windows(cfg_for(corpus, windows=5), smol_tokenizer, bos_id(smol_tokenizer))
    assert re.search(r"files: scanned 60 docs .* made 5 windows of 63 tokens in", caplog.text)


def test_needs_a_fast_tokenizer(corpus) -> None:
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast"):
        sample_windows(cfg_for(corpus), Slow(), 0)


def test_pydocs_gives_windows(smol_tokenizer) -> None:
    cfg = Config(sources="pydocs", windows=25, window_len=64)
    df = sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    assert len(df) == 25 and set(df.source) == {"pydocs"} and df.doc_id.is_unique
    assert all(len(t) == 64 for t in df.tokens)
