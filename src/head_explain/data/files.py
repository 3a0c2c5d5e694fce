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

from head_explain.data import SNIFF_BYTES, Document, decode_text, sniff_text
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
        if suffix == ".parquet":
            text_column_type(name, ConfigError, "key 'data_files': ")
            continue
        with open(name, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
        if not sniff_text(head):
            raise ConfigError(f"key 'data_files': '{name}' {NOT_TEXT}")
    return names


NOT_TEXT = (
    "is not UTF-8 text (binary, or another encoding such as latin-1); give text files "
    "or convert it to UTF-8"
)


def text_column_type(path: str | Path, error: type[Exception], prefix: str = "") -> None:
    """Refuse a parquet file without a string `text` column (reads the footer only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        why = " ".join(str(exc).split())[:160]
        raise error(f"{prefix}'{path}' is not a readable parquet file ({why})") from None
    if "text" not in schema.names:
        raise error(f"{prefix}'{path}' has no 'text' column (columns: {', '.join(schema.names)})")
    typ = schema.field("text").type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise error(f"{prefix}'{path}' column 'text' holds {typ}, not strings; give a text column")


def iter_txt(name: str) -> Iterator[Document]:
    text = decode_text(Path(name).read_bytes())
    if text is None:
        raise DataError(f"'{name}' {NOT_TEXT}")
    if text.strip():
        yield Document(SOURCE, name, text)


def iter_jsonl(name: str) -> Iterator[Document]:
    with open(name, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = decode_text(raw)  # a BOM on the first line is dropped
            if line is None:
                raise DataError(f"'{name}' line {lineno}: {NOT_TEXT}")
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except RecursionError:
                raise DataError(f"'{name}' line {lineno}: JSON nested too deeply") from None
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
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

    text_column_type(path, DataError)
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["text"]):
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        why = " ".join(str(exc).split())[:160]
        raise DataError(f"'{path}' is not a readable parquet file ({why})") from None


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
