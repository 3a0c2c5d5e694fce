"""Corpus sources on small files built here, in every format each source accepts."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import warnings
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from head_explain.config import Config
from head_explain.data import Document, iter_documents, pydocs, stackexchange, wikitext
from head_explain.data import files as files_mod
from head_explain.errors import ConfigError, DataError

LONG = "This sentence is plain English prose about coffee and tea. " * 6


def docs(cfg: Config, source: str) -> list[Document]:
    return list(iter_documents(cfg, source))


def test_document_is_frozen() -> None:
    d = Document("files", "a.txt", "text")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.text = "other"  # type: ignore[misc]


def test_unknown_source_names_the_key() -> None:
    with pytest.raises(ConfigError, match="key 'sources': unknown source 'nope'"):
        iter_documents(Config(), "nope")


# --- pydocs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pydocs_docs() -> list[Document]:
    return list(pydocs.iter_pydocs())


def test_pydocs_many_english_docs(pydocs_docs: list[Document]) -> None:
    ids = [d.doc_id for d in pydocs_docs]
    assert len(ids) == len(set(ids)) > 300
    topics = [i for i in ids if i.startswith("topic/")]
    modules = [i for i in ids if i.startswith("module/")]
    assert len(topics) > 50 and len(modules) > 200
    assert topics == sorted(topics) and modules == sorted(modules)
    assert {"module/json", "module/argparse", "topic/if"} <= set(ids)
    text = " ".join(d.text for d in pydocs_docs)
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) > 150_000
    common = sum(w in {"the", "a", "is", "of", "to", "and", "in"} for w in words)
    assert common / len(words) > 0.1  # prose, not code
    assert all(d.source == "pydocs" and len(d.text) >= 200 for d in pydocs_docs)


def test_pydocs_skips_tests_idle_and_vendored(pydocs_docs: list[Document]) -> None:
    bad = re.compile(r"(^|\.)(test|tests|idlelib|lib2to3|turtledemo|ensurepip)(\.|$)")
    names = [d.doc_id.removeprefix("module/") for d in pydocs_docs if d.doc_id[:7] == "module/"]
    assert not [n for n in names if bad.search(n)]


def test_pydocs_order_is_deterministic() -> None:
    root = pydocs.stdlib_dir()
    assert pydocs.module_files(root) == pydocs.module_files(root)


def test_pydocs_reads_sources_with_ast_only(tmp_path: Path) -> None:
    """A fake stdlib: long docstrings kept, short ones, tests and broken files skipped."""
    long_doc = "Explain why this exists. " * 12
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'"""{long_doc}"""\nraise SystemExit("never imported")\n')
    (pkg / "mod.py").write_text(
        f'"""short"""\nclass A:\n    """{long_doc}A"""\n    def f(self):\n'
        f'        """{long_doc}f"""\ndef g():\n    """tiny"""\n'
    )
    (pkg / "tests" / "test_x.py").write_text(f'"""{long_doc}"""\n')
    (tmp_path / "broken.py").write_text('"""x\n')
    (tmp_path / "idlelib").mkdir()
    (tmp_path / "idlelib" / "x.py").write_text(f'"""{long_doc}"""\n')
    got = list(pydocs.iter_modules(tmp_path))
    assert [d.doc_id for d in got] == ["module/pkg", "module/pkg.mod"]
    assert got[1].text == f"{long_doc}A\n\n{long_doc}f"


# --- wikitext ------------------------------------------------------------------------

ROWS = [
    "",
    " = Alpha = \n",
    "",
    " Alpha is the first article . \n",
    "",
    " = = History = = \n",
    "",
    " It has a history section . \n",
    "",
    " = = = Early = = = \n",
    " Deeper . \n",
    "",
    "",
    " = Beta Gamma ( song ) = \n",
    "",
    " Beta text . \n",
    "",
]


def write_parquet(path: Path, rows: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), path)


def wt_cfg(path: Path, **kw) -> Config:
    kw = {"wikitext_config": "wikitext-2-raw-v1", "wikitext_split": "test", **kw}
    return Config(sources="wikitext", wikitext_dir=str(path), **kw)


def test_article_title() -> None:
    assert wikitext.article_title(" = Robert Boulter = \n") == "Robert Boulter"
    assert wikitext.article_title(" = = Career = = \n") is None
    assert wikitext.article_title(" = = = Film = = = \n") is None
    assert wikitext.article_title(" Text with = sign . \n") is None
    assert wikitext.article_title("") is None


@pytest.mark.parametrize("layout", ["root", "config", "split"])
def test_wikitext_hf_layouts(tmp_path: Path, layout: str) -> None:
    write_parquet(tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet", ROWS)
    write_parquet(tmp_path / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet", ["x\n"])
    where = {
        "root": tmp_path,
        "config": tmp_path / "wikitext-2-raw-v1",
        "split": tmp_path / "wikitext-2-raw-v1",
    }[layout]
    got = docs(wt_cfg(where), "wikitext")
    assert [d.doc_id for d in got] == ["0:Alpha", "1:Beta Gamma ( song )"]
    assert got[0].text == (
        " = Alpha = \n\n Alpha is the first article . \n\n = = History = = \n\n"
        " It has a history section . \n\n = = = Early = = = \n Deeper . "
    )
    assert got[1].text == " = Beta Gamma ( song ) = \n\n Beta text . "
    assert all(d.source == "wikitext" for d in got)


def test_wikitext_streams_across_files_and_batches(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(wikitext, "BATCH_ROWS", 2)
    folder = tmp_path / "wikitext-2-raw-v1"
    write_parquet(folder / "test-00000-of-00002.parquet", ROWS[:8])
    write_parquet(folder / "test-00001-of-00002.parquet", ROWS[8:])
    got = docs(wt_cfg(tmp_path), "wikitext")
    assert [d.doc_id for d in got] == ["0:Alpha", "1:Beta Gamma ( song )"]
    assert "Deeper" in got[0].text  # an article continues into the next file


def test_wikitext_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"key 'wikitext_dir': '.*nope' is not a folder"):
        docs(wt_cfg(tmp_path / "nope"), "wikitext")


def test_wikitext_no_parquet(tmp_path: Path) -> None:
    write_parquet(tmp_path / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet", ROWS)
    with pytest.raises(DataError, match=r"no 'test-\*.parquet' in .*split 'test'"):
        docs(wt_cfg(tmp_path), "wikitext")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"'wikitext_dir': no 'test-.*found: nothing"):
        docs(wt_cfg(empty), "wikitext")


def test_wikitext_parquet_without_text_column(tmp_path: Path) -> None:
    path = tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"line": ["a"]}), path)
    with pytest.raises(DataError, match="has no 'text' column"):
        docs(wt_cfg(tmp_path), "wikitext")


def test_wikitext_hub_unavailable_is_a_config_error(monkeypatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFound)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="--wikitext-dir.*--sources pydocs"):
        docs(Config(sources="wikitext"), "wikitext")


def test_wikitext_through_datasets(monkeypatch) -> None:
    import datasets

    calls = []

    def fake(path, name, split, cache_dir=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ROWS})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    got = docs(
        Config(wikitext_config="wikitext-103-raw-v1", wikitext_split="validation"), "wikitext"
    )
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "validation")]
    assert [d.doc_id for d in got] == ["0:Alpha", "1:Beta Gamma ( song )"]


# --- stackexchange -------------------------------------------------------------------


def se_doc(title: str) -> str:
    return f"Q:\n\n{title}\n\n{LONG}\n\nA:\n\nAn answer.\n\n"


def write_zip(path: Path, entries: list[tuple[str, str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns on duplicate names
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, text in entries:
                zf.writestr(name, text)


def write_zst(path: Path, records: list[dict], frames: int = 1) -> None:
    lines = [json.dumps(r).encode() + b"\n" for r in records]
    step = max(1, len(lines) // frames)
    out = io.BytesIO()
    for i in range(0, len(lines), step):  # lm_dataformat may write several frames
        out.write(zstandard.ZstdCompressor().compress(b"".join(lines[i : i + step])))
    path.write_bytes(out.getvalue())


def se_cfg(path: Path) -> Config:
    return Config(sources="stackexchange", stackexchange_dir=str(path))


def test_stackexchange_zip_skips_duplicate_entries(tmp_path: Path) -> None:
    write_zip(
        tmp_path / "coffee.stackexchange.zip",
        [
            ("coffee.stackexchange_0000000001.txt", se_doc("one")),
            ("coffee.stackexchange_0000000002.txt", se_doc("two")),
            ("coffee.stackexchange_0000000001.txt", se_doc("one again")),  # a re-run
        ],
    )
    got = docs(se_cfg(tmp_path), "stackexchange")
    assert [d.doc_id for d in got] == [
        "coffee.stackexchange/coffee.stackexchange_0000000001.txt",
        "coffee.stackexchange/coffee.stackexchange_0000000002.txt",
    ]
    assert got[0].text.startswith("Q:\n\none\n\n")


def test_stackexchange_all_three_formats(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write_zip(out / "tea.stackexchange.zip", [("tea.stackexchange_0000000007.txt", se_doc("z"))])
    (out / "unix.stackexchange_0000000003.txt").write_text(se_doc("loose"))
    write_zst(
        out / "data_0_time1700000000_stackoverflow.jsonl.zst",
        [
            {"text": se_doc(f"q{i}"), "meta": {"name": f"stackoverflow_{i:010d}.txt"}}
            for i in range(5)
        ],
        frames=2,
    )
    # The folder above `out` works too: the tool always writes into ./out/.
    for root in (out, tmp_path):
        got = docs(se_cfg(root), "stackexchange")
        ids = [d.doc_id for d in got]
        assert ids[:5] == [f"stackoverflow/stackoverflow_{i:010d}.txt" for i in range(5)]
        assert ids[5:] == [
            "tea.stackexchange/tea.stackexchange_0000000007.txt",
            "unix.stackexchange/unix.stackexchange_0000000003.txt",
        ]
        assert got[-1].text == se_doc("loose")


def test_stackexchange_missing_or_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'stackexchange_dir': '.*missing' is not a folder"):
        docs(se_cfg(tmp_path / "missing"), "stackexchange")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ConfigError, match=r"'stackexchange_dir'.*no \.zip, \.txt or \.jsonl\.zst"):
        docs(se_cfg(tmp_path), "stackexchange")


def test_stackexchange_corrupt_zip(tmp_path: Path) -> None:
    (tmp_path / "coffee.stackexchange.zip").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    with pytest.raises(DataError, match=r"coffee\.stackexchange\.zip' is not a valid zip archive"):
        docs(se_cfg(tmp_path), "stackexchange")


def test_stackexchange_corrupt_zst(tmp_path: Path) -> None:
    path = tmp_path / "data_0_time1_coffee.stackexchange.jsonl.zst"
    path.write_bytes(b"this is not zstd at all" * 10)
    with pytest.raises(DataError, match=r"jsonl\.zst' is not a valid zstd stream"):
        docs(se_cfg(tmp_path), "stackexchange")


def test_stackexchange_truncated_zst(tmp_path: Path) -> None:
    path = tmp_path / "data_0_time1_coffee.stackexchange.jsonl.zst"
    write_zst(path, [{"text": se_doc(str(i)), "meta": {"name": f"c_{i}.txt"}} for i in range(9)])
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match="is not a valid zstd stream .*truncated"):
        docs(se_cfg(tmp_path), "stackexchange")


def test_stackexchange_zst_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "data_0_time1_coffee.stackexchange.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\nnot json\n'))
    with pytest.raises(DataError, match="line 2: expected a JSON object with a 'text' field"):
        docs(se_cfg(tmp_path), "stackexchange")


def test_stackexchange_site_of_entry() -> None:
    assert stackexchange.site_of_entry("unix.stackexchange_0000000042.txt") == "unix.stackexchange"
    assert stackexchange.site_of_entry("stackoverflow_0000000042.txt") == "stackoverflow"


# --- files ---------------------------------------------------------------------------


def files_cfg(*paths: Path | str) -> Config:
    return Config(sources="files", data_files=",".join(map(str, paths)))


def test_files_all_formats(tmp_path: Path) -> None:
    txt = tmp_path / "essay.txt"
    txt.write_text(LONG)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    parquet = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": ["p0", "", "p2"], "id": [1, 2, 3]}), parquet)
    got = docs(files_cfg(txt, jsonl, parquet), "files")
    assert [(d.doc_id, d.text) for d in got] == [
        (str(txt), LONG),
        (f"{jsonl}:1", "first"),
        (f"{jsonl}:3", "third"),
        (f"{parquet}:0", "p0"),
        (f"{parquet}:2", "p2"),
    ]
    assert {d.source for d in got} == {"files"}


def test_files_parquet_streams_in_batches(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(files_mod, "BATCH_ROWS", 3)
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), parquet)
    got = docs(files_cfg(parquet), "files")
    assert [d.doc_id for d in got] == [f"{parquet}:{i}" for i in range(10)]


def test_files_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(
        ConfigError, match=r"'data_files': '.*a\.csv' has unknown extension '\.csv'"
    ):
        docs(files_cfg(tmp_path / "a.csv"), "files")
    with pytest.raises(ConfigError, match=r"'data_files': '.*gone\.txt' does not exist"):
        docs(files_cfg(tmp_path / "gone.txt"), "files")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    # parquet footers are checked up front with the other data_files checks
    with pytest.raises(ConfigError, match=r"bad\.parquet' has no 'text' column \(columns: body\)"):
        docs(files_cfg(bad), "files")
    with pytest.raises(DataError, match=r"bad\.parquet' has no 'text' column"):
        list(files_mod.iter_text_column(bad))  # the reader wikitext shares
    notparquet = tmp_path / "fake.parquet"
    notparquet.write_text("plain text")
    with pytest.raises(ConfigError, match=r"fake\.parquet' is not a readable parquet file"):
        docs(files_cfg(notparquet), "files")
    badjson = tmp_path / "bad.jsonl"
    badjson.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl' line 2: expected a JSON object"):
        docs(files_cfg(badjson), "files")


def test_files_empty_list() -> None:
    with pytest.raises(ConfigError, match="key 'data_files': empty"):
        docs(Config(sources="files", data_files=" , "), "files")
