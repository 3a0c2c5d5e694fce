"""The readers and the sampler on the real corpora in ../shared/data (skips without it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from head_explain.config import Config
from head_explain.data import iter_documents
from head_explain.data.wikitext import article_title
from head_explain.data.windows import sample_windows
from head_explain.errors import DataError
from head_explain.models import bos_id

pytestmark = pytest.mark.shared_data


def wikitext_cfg(shared: Path, **kw) -> Config:
    base = {
        "sources": "wikitext",
        "wikitext_dir": str(shared / "wikitext"),
        "wikitext_config": "wikitext-2-raw-v1",
        "wikitext_split": "test",
    }
    return Config(**{**base, **kw})


def coffee_cfg(shared: Path, **kw) -> Config:
    return Config(
        sources="stackexchange", stackexchange_dir=str(shared / "stackexchange" / "out"), **kw
    )


def test_wikitext2_test_split_articles(shared_data: Path) -> None:
    docs = list(iter_documents(wikitext_cfg(shared_data), "wikitext"))
    # The original file: article headings are lines " = Title = " (one '=' each side).
    raw = (shared_data / "wikitext" / "wiki.test.raw").read_text(encoding="utf-8")
    titles = re.findall(r"^ = ([^=].*[^=]) = $", raw, flags=re.M)
    assert len(docs) == len(titles) == 62
    assert [d.doc_id.split(":", 1)[1] for d in docs] == titles
    assert docs[0].doc_id == "0:Robert Boulter"
    assert docs[0].text.startswith(" = Robert Boulter = \n\n Robert Boulter is an English film")
    for d in docs:
        lines = d.text.split("\n")
        assert article_title(lines[0]) and not any(map(article_title, lines[1:]))
        assert d.text == d.text.strip("\n")
    # Every non-blank line of the split lands in exactly one article.
    lines = sum(1 for ln in raw.splitlines() if ln.strip())
    assert sum(1 for d in docs for ln in d.text.splitlines() if ln.strip()) == lines


def test_coffee_zip_documents(shared_data: Path) -> None:
    docs = list(iter_documents(coffee_cfg(shared_data), "stackexchange"))
    assert len(docs) == len({d.doc_id for d in docs}) == 181
    assert all(d.text.startswith("Q:\n\n") for d in docs)
    assert all(
        re.fullmatch(r"coffee\.stackexchange/coffee\.stackexchange_\d{10}\.txt", d.doc_id)
        for d in docs
    )
    assert sum("\n\nA:\n\n" in d.text for d in docs) > 150


def test_windows_from_both_real_corpora(shared_data: Path, smol_tokenizer) -> None:
    cfg = wikitext_cfg(
        shared_data,
        sources="wikitext,stackexchange",
        stackexchange_dir=str(shared_data / "stackexchange" / "out"),
        windows=200,
        window_len=192,
    )
    df = sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    assert df.source.value_counts().to_dict() == {"stackexchange": 100, "wikitext": 100}
    assert all(len(t) == 192 for t in df.tokens)
    wiki = df[df.source == "wikitext"]
    assert wiki.doc_id.nunique() >= 55  # one window per article before a second
    coffee = df[df.source == "stackexchange"]
    assert coffee.doc_id.is_unique


@pytest.mark.parametrize(
    ("which", "window_len", "low", "high"),
    [("wikitext", 192, 1400, 1700), ("stackexchange", 192, 250, 400)],
)
def test_capacity_of_real_corpora(shared_data, smol_tokenizer, which, window_len, low, high):
    """How many windows each corpus can give: the error names a limit that is plausible."""
    make = wikitext_cfg if which == "wikitext" else coffee_cfg
    cfg = make(shared_data, windows=100_000, window_len=window_len)
    with pytest.raises(DataError, match=rf"sources '{which}' give only (\d+) windows") as err:
        sample_windows(cfg, smol_tokenizer, bos_id(smol_tokenizer))
    got = int(re.search(r"give only (\d+)", str(err.value)).group(1))
    assert low <= got <= high
