"""StackExchange Q&A: the `out` folder written by EleutherAI/stackexchange-dataset.

That tool has three output formats and users have whichever they ran, so all are
read: `<site>.zip` (stored, possibly ZIP64 with millions of entries; a re-run
appends duplicate entry names), loose `<site>_<id>.txt` files, and lm_dataformat's
`data_<n>_time<t>_<site>.jsonl.zst`. Everything is streamed entry by entry.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from head_explain.data import Document, decode_text
from head_explain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from head_explain.config import Config

log = logging.getLogger(__name__)

SOURCE = "stackexchange"
LAYOUT = (
    "<site>.zip archives, loose <site>_<id>.txt files or "
    "data_<n>_time<unixtime>_<site>.jsonl.zst files, as EleutherAI/stackexchange-dataset "
    "writes them into its out/ folder"
)
ZST_NAME_RE = re.compile(r"^data_\d+_time\d+_(?P<site>.+)\.jsonl\.zst$")


def site_of_entry(name: str) -> str:
    """`coffee.stackexchange_0000000005.txt` -> `coffee.stackexchange`."""
    stem = Path(name).name.removesuffix(".txt")
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def find_files(root: Path) -> list[Path]:
    """The dump files in `root` (or in `root/out`), sorted by name for a stable order."""
    if not root.is_dir():
        raise ConfigError(f"key 'stackexchange_dir': '{root}' is not a folder; expected {LAYOUT}")
    for folder in (root, root / "out"):
        if not folder.is_dir():
            continue
        files = [
            p
            for p in folder.iterdir()
            if p.is_file() and (p.suffix in (".zip", ".txt") or p.name.endswith(".jsonl.zst"))
        ]
        if files:
            return sorted(files, key=lambda p: p.name)
    raise ConfigError(
        f"key 'stackexchange_dir': '{root}' holds no .zip, .txt or .jsonl.zst files; "
        f"expected {LAYOUT}"
    )


def _report_skipped(where: Path, skipped: dict[str, list[str]]) -> None:
    """One warning per reason, naming the first few skipped entries."""
    for why, names in skipped.items():
        shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        log.warning(
            "stackexchange: skipped %d entries of %s (%s): %s", len(names), where, why, shown
        )


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[str | None, str]:
    """(text, "") or (None, why the entry is skipped)."""
    if info.flag_bits & 0x1:
        return None, "encrypted"
    try:
        with zf.open(info) as fh:
            data = fh.read()
    except NotImplementedError:  # e.g. an unsupported compression method
        return None, f"unsupported compression method {info.compress_type}"
    text = decode_text(data)
    return (text, "") if text is not None else (None, "not UTF-8 text")


def iter_zip(path: Path) -> Iterator[Document]:
    """Entries as documents; encrypted, undecodable and non-text entries are skipped,
    counted and named in a warning."""
    site = path.name.removesuffix(".zip")
    skipped: dict[str, list[str]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            seen: set[str] = set()
            for info in zf.infolist():
                if info.is_dir() or info.filename in seen:
                    continue  # a re-run of the tool appends the same entries again
                seen.add(info.filename)
                text, why = _read_entry(zf, info)
                if text is None:
                    skipped.setdefault(why, []).append(info.filename)
                elif text.strip():
                    yield Document(SOURCE, f"{site}/{info.filename}", text)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, RuntimeError) as exc:
        why = " ".join(str(exc).split())[:160]
        raise DataError(f"'{path}' is not a valid zip archive ({why})") from None
    finally:
        _report_skipped(path, skipped)


def iter_txt(path: Path) -> Iterator[Document]:
    text = decode_text(path.read_bytes())
    if text is None:
        _report_skipped(path.parent, {"not UTF-8 text": [path.name]})
        return
    if text.strip():
        yield Document(SOURCE, f"{site_of_entry(path.name)}/{path.name}", text)


def _zst_chunks(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed bytes of every frame; a truncated last frame is an error.

    (`ZstdDecompressor.stream_reader` ends quietly on a truncated file, which would
    drop documents without a word.)
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, pending = dctx.decompressobj(), False
    try:
        with path.open("rb") as raw:
            while chunk := raw.read(chunk_bytes):
                while chunk:
                    out = dobj.decompress(chunk)
                    pending = True
                    if out:
                        yield out
                    if dobj.eof:  # frame done; lm_dataformat may append more frames
                        chunk = dobj.unused_data
                        dobj, pending = dctx.decompressobj(), False
                    else:
                        chunk = b""
    except zstandard.ZstdError as exc:
        raise DataError(f"'{path}' is not a valid zstd stream ({exc})") from None
    if pending:
        raise DataError(
            f"'{path}' is not a valid zstd stream (truncated: the last frame ends early)"
        )


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    buf = b""
    for chunk in chunks:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf


def iter_zst(path: Path) -> Iterator[Document]:
    m = ZST_NAME_RE.match(path.name)
    file_site = m.group("site") if m else None
    for lineno, line in enumerate(_lines(_zst_chunks(path)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj["text"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
            raise DataError(
                f"'{path}' line {lineno}: expected a JSON object with a 'text' field "
                '({"text": ..., "meta": {"name": ...}})'
            ) from None
        meta = obj.get("meta") or {}
        name = meta.get("name") if isinstance(meta, dict) else None
        name = str(name) if name else f"{path.name}:{lineno}"
        site = file_site or site_of_entry(name)
        if isinstance(text, str) and text.strip():
            yield Document(SOURCE, f"{site}/{name}", text)


def iter_stackexchange(cfg: Config) -> Iterator[Document]:
    """All documents of all dump files under `cfg.stackexchange_dir`."""
    if not cfg.stackexchange_dir:
        raise ConfigError(
            f"key 'stackexchange_dir': empty, but sources include stackexchange; expected {LAYOUT}"
        )
    files = find_files(Path(cfg.stackexchange_dir))  # eager: a bad folder fails at once
    log.debug("stackexchange: %d file(s) in %s", len(files), cfg.stackexchange_dir)
    return _iter_files(files)


def _iter_files(files: list[Path]) -> Iterator[Document]:
    for path in files:
        if path.suffix == ".zip":
            yield from iter_zip(path)
        elif path.suffix == ".txt":
            yield from iter_txt(path)
        else:
            yield from iter_zst(path)
