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


__all__ = ["Document", "iter_documents"]
