"""Corpus sources as streams of documents.

Every source yields `Document`s from a generator so that a corpus with millions of
entries (WikiText-103, a StackExchange dump) is never held in memory; the window
sampler (`head_explain.data.windows`) keeps only the few documents it samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from head_explain.config import SOURCES
from head_explain.errors import ConfigError

if TYPE_CHECKING:
    from head_explain.config import Config


@dataclass(frozen=True)
class Document:
    """One unit of text windows are cut from; `doc_id` is unique within its source."""

    source: str
    doc_id: str
    text: str


SNIFF_BYTES = 1 << 16


def decode_text(data: bytes) -> str | None:
    """UTF-8 text with a leading BOM dropped; None for binary or non-UTF-8 bytes.

    A NUL byte in the first block marks binary data (images, archives, compiled
    files); latin-1 and other legacy encodings fail the strict UTF-8 decode. Either
    would otherwise reach the model as a stream of replacement characters.
    """
    if b"\x00" in data[:SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None


def sniff_text(head: bytes) -> bool:
    """Whether the first bytes of a file look like UTF-8 text (a cut-off last
    character allowed)."""
    import codecs

    if b"\x00" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


def iter_documents(cfg: Config, source: str) -> Iterator[Document]:
    """Stream the documents of one source in a deterministic order."""
    # Imports are local so that `pydocs` alone never pays for pyarrow or datasets.
    if source == "pydocs":
        from head_explain.data.pydocs import iter_pydocs

        return iter_pydocs()
    if source == "wikitext":
        from head_explain.data.wikitext import iter_wikitext

        return iter_wikitext(cfg)
    if source == "stackexchange":
        from head_explain.data.stackexchange import iter_stackexchange

        return iter_stackexchange(cfg)
    if source == "files":
        from head_explain.data.files import iter_files

        return iter_files(cfg)
    raise ConfigError(f"key 'sources': unknown source '{source}'; valid: {', '.join(SOURCES)}")


__all__ = ["Document", "decode_text", "iter_documents", "sniff_text"]
