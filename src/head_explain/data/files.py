"""Local files as a corpus: the user's own text, no download or dataset layout needed.

`data_files` is a comma-separated list; the extension picks the reader:
`.txt` (the whole file is one document), `.jsonl` (one document a line, field
`text`) and `.parquet` (column `text`, read in row batches so large files stream).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from head_explain.data import Document
from head_explain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from head_explain.config import Config

SOURCE = "files"
EXTENSIONS = (".txt", ".jsonl", ".parquet")
BATCH_ROWS = 4096


def file_list(cfg: Config) -> list[str]:
    """The entries of `data_files`, checked up front so errors come before any scan."""
    names = [s.strip() for s in cfg.data_files.split(",") if s.strip()]
    if not names:
        raise ConfigError("key 'data_files': empty, but sources include files")
    for name in names:
        suffix = Path(name).suffix.lower()
        if suffix not in EXTENSIONS:
            raise ConfigError(
                f"key 'data_files': '{name}' has unknown extension '{suffix}'; "
                f"valid: {', '.join(EXTENSIONS)}"
            )
        if not Path(name).is_file():
            raise ConfigError(f"key 'data_files': '{name}' does not exist or is not a file")
    return names


def iter_txt(name: str) -> Iterator[Document]:
    text = Path(name).read_text(encoding="utf-8", errors="replace")
    if text.strip():
        yield Document(SOURCE, name, text)


def iter_jsonl(name: str) -> Iterator[Document]:
    with open(name, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"'{name}' line {lineno}: expected a JSON object with a 'text' field"
                ) from None
            if not isinstance(text, str):
                raise DataError(f"'{name}' line {lineno}: 'text' is not a string")
            if text.strip():
                yield Document(SOURCE, f"{name}:{lineno}", text)


def iter_text_column(path: str | Path) -> Iterator[str | None]:
    """The `text` column of a parquet file, streamed in row batches (shared with wikitext)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"'{path}' is not a readable parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise DataError(
            f"'{path}' has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})"
        )
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["text"]):
        yield from batch.column(0).to_pylist()


def iter_parquet(name: str) -> Iterator[Document]:
    for row, text in enumerate(iter_text_column(name)):
        if isinstance(text, str) and text.strip():
            yield Document(SOURCE, f"{name}:{row}", text)


def iter_files(cfg: Config) -> Iterator[Document]:
    """Documents of every file in `data_files`, in the order given."""
    names = file_list(cfg)
    return _iter(names)


def _iter(names: list[str]) -> Iterator[Document]:
    readers = {".txt": iter_txt, ".jsonl": iter_jsonl, ".parquet": iter_parquet}
    for name in names:
        yield from readers[Path(name).suffix.lower()](name)
