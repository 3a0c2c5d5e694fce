"""WikiText (Salesforce/wikitext): Wikipedia Good/Featured articles, one row per line.

The rows are lines, so documents are rebuilt by splitting at article headings
(` = Title = `); a window then never spans two unrelated articles. Rows come from
local parquet files in the Hugging Face layout (`wikitext_dir`, works offline) or
from the `datasets` library and its cache; both are read in batches, so even
WikiText-103 train (1.8 M rows) is streamed rather than loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from head_explain.data import Document
from head_explain.data.files import iter_text_column
from head_explain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from head_explain.config import Config

log = logging.getLogger(__name__)

SOURCE = "wikitext"
HF_ID = "Salesforce/wikitext"
BATCH_ROWS = 8192
# Exactly one '=' each side; ` = = Section = = ` (and deeper) are subheadings.
TITLE_RE = re.compile(r"^ = (?!=)(.*?)(?<!=) = $")


def article_title(row: str) -> str | None:
    """The title if `row` opens an article, else None."""
    m = TITLE_RE.match(row.rstrip("\n"))
    return m.group(1).strip() if m else None


def split_articles(rows: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Lines -> (title, article text) with leading/trailing blank lines stripped.

    Blank rows are `""` in the HF files and stand for an empty line; other rows keep
    their `\\n`. Text before the first heading (none in the real splits) becomes an
    article with an empty title rather than being dropped silently.
    """
    title = ""
    lines: list[str] = []

    def flush() -> Iterator[tuple[str, str]]:
        start, end = 0, len(lines)
        while start < end and not lines[start].strip():
            start += 1
        while end > start and not lines[end - 1].strip():
            end -= 1
        if start < end:
            text = "".join(x if x.endswith("\n") else x + "\n" for x in lines[start:end])
            yield title, text.removesuffix("\n")

    for row in rows:
        row = row or ""
        new_title = article_title(row)
        if new_title is not None:
            yield from flush()
            title, lines = new_title, []
        lines.append(row)
    yield from flush()


def _documents(rows: Iterable[str]) -> Iterator[Document]:
    for i, (title, text) in enumerate(split_articles(rows)):
        yield Document(SOURCE, f"{i}:{title}", text)


def parquet_files(root: Path, config: str, split: str) -> list[Path]:
    """The split's parquet files under `root` (HF layout, config folder or split folder)."""
    if not root.is_dir():
        raise DataError(
            f"key 'wikitext_dir': '{root}' is not a folder; expected the HF parquet layout "
            f"<dir>/{config}/{split}-*.parquet (or the {config} folder itself)"
        )
    for folder in (root / config, root):
        files = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob(f"{split}.parquet"))
        if files:
            return files
    present = sorted(p.name for p in root.iterdir())[:8]
    raise DataError(
        f"key 'wikitext_dir': no '{split}-*.parquet' in '{root}' or '{root / config}' "
        f"(config '{config}', split '{split}'); found: {', '.join(present) or 'nothing'}"
    )


def iter_parquet_rows(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield from iter_text_column(path)


def load_hf_split(config: str, split: str, cache_dir: str | None = None):
    """The split as a memory-mapped `datasets.Dataset` (downloads once, then the cache)."""
    try:
        import datasets

        return datasets.load_dataset(HF_ID, config, split=split, cache_dir=cache_dir)
    except Exception as exc:  # offline + no cache, unknown config, hub errors, ...
        first = (str(exc).splitlines() or [""])[0][:160]
        raise ConfigError(
            f"key 'wikitext_dir': empty and {HF_ID} ({config}, {split}) cannot be loaded "
            f"through `datasets` ({type(exc).__name__}: {first}); pass --wikitext-dir with "
            "a local parquet copy (<dir>/<config>/<split>-*.parquet) or use --sources pydocs"
        ) from None


def iter_dataset_rows(ds) -> Iterator[str]:
    for batch in ds.iter(batch_size=BATCH_ROWS):
        yield from batch["text"]


def iter_wikitext(cfg: Config) -> Iterator[Document]:
    """Articles of the configured config/split, in dataset order."""
    if cfg.wikitext_dir:
        files = parquet_files(Path(cfg.wikitext_dir), cfg.wikitext_config, cfg.wikitext_split)
        log.debug("wikitext: reading %s", ", ".join(map(str, files)))
        rows = iter_parquet_rows(files)
    else:
        # Loaded here, not lazily, so a missing dataset fails before any scanning starts.
        rows = iter_dataset_rows(load_hf_split(cfg.wikitext_config, cfg.wikitext_split))
    return _documents(rows)
