"""Sample fixed-length token windows from the corpus sources.

The sample must be reproducible (same seed, same windows) and cheap on corpora far
larger than the sample, so nothing is tokenized wholesale:

1. Each source is streamed once; every document gets a priority
   `hash(seed, source, doc_id)` and a bounded heap keeps the K lowest - a uniform
   random subset of documents that does not depend on the scan order.
2. Kept documents are tokenized lazily in priority order. Round 1 cuts one window
   per document (the sample then spreads over as many documents as possible);
   only when every kept document has given one does round 2 take a second, etc.
   Windows of one document never overlap: they sit on a grid of `text_len` tokens
   shifted by a seeded random offset, visited in seeded random order.
3. Too few windows from the K documents (many short ones): rescan with a larger K,
   up to every document of the source; still too few is a `DataError`.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from head_explain.config import source_list
from head_explain.data import Document, iter_documents
from head_explain.data.window_shares import source_shares, too_small_error
from head_explain.errors import ConfigError

if TYPE_CHECKING:
    from head_explain.config import Config

log = logging.getLogger(__name__)

COLUMNS = ["window_id", "source", "doc_id", "char_start", "char_end", "tokens", "text"]
TOKENIZE_BATCH = 32  # documents per tokenizer call; does not change the sample


@dataclass
class Window:
    source: str
    doc_id: str
    char_start: int
    char_end: int
    tokens: np.ndarray  # int32, text tokens only (BOS is prepended at the end)
    text: str


@dataclass
class _Tokenized:
    """A kept document, tokenized, with its seeded window grid."""

    doc: Document
    ids: np.ndarray  # int32
    starts: np.ndarray  # int64 char offsets
    ends: np.ndarray
    slots: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # token starts

    @property
    def capacity(self) -> int:
        return len(self.slots)


def _hash64(*parts: object) -> int:
    """A process-independent 64-bit hash (Python's `hash` is salted per process)."""
    data = "\x00".join(map(str, parts)).encode("utf-8", errors="surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def doc_priority(seed: int, source: str, doc_id: str) -> int:
    return _hash64("priority", seed, source, doc_id)


def _progress(docs: Iterable[Document], source: str) -> Iterator[Document]:
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, silence in DVC logs and CI.
    yield from tqdm(docs, desc=f"scan {source}", unit="doc", disable=None, leave=False)


def scan_source(
    cfg: Config, source: str, keep: int, min_bytes: int
) -> tuple[list[Document], int, int]:
    """Stream a source, keep its `keep` lowest-priority documents (in priority order).

    Documents under `min_bytes` UTF-8 bytes cannot hold a window with a byte-level
    tokenizer and are not kept. Returns (kept, scanned, eligible).
    """
    heap: list[tuple[int, int, Document]] = []  # (-priority, -order, doc): max-heap
    in_heap: set[str] = set()
    scanned = eligible = 0
    for order, doc in enumerate(_progress(iter_documents(cfg, source), source)):
        scanned += 1
        if len(doc.text) < min_bytes and len(doc.text.encode("utf-8", "replace")) < min_bytes:
            continue
        if doc.doc_id in in_heap:
            continue  # the same entry twice (e.g. loose txt beside its zip)
        eligible += 1
        item = (-doc_priority(cfg.seed, source, doc.doc_id), -order, doc)
        if len(heap) < keep:
            heapq.heappush(heap, item)
            in_heap.add(doc.doc_id)
        elif item[:2] > heap[0][:2]:
            in_heap.discard(heapq.heapreplace(heap, item)[2].doc_id)
            in_heap.add(doc.doc_id)
    kept = [d for _, _, d in sorted(heap, key=lambda t: (-t[0], -t[1]))]
    return kept, scanned, eligible


def _encode(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, char offsets) per text, no special tokens.

    The Rust backend is called directly when it carries no truncation or padding
    state: about twice as fast as the transformers wrapper, same ids and offsets.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        verbose=False,  # no "longer than the model's maximum length" warnings: we cut
    )
    return list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))


def _tokenize(tokenizer, docs: list[Document], seed: int, text_len: int) -> list[_Tokenized]:
    encoded = _encode(tokenizer, [d.text for d in docs])
    out = []
    for doc, (ids, offsets) in zip(docs, encoded, strict=True):
        ids_arr = np.asarray(ids, dtype=np.int32)
        offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        t = _Tokenized(doc, ids_arr, offs[:, 0].copy(), offs[:, 1].copy())
        n_slots = len(ids_arr) // text_len
        if n_slots:
            rng = np.random.default_rng(_hash64("windows", seed, doc.source, doc.doc_id))
            shift = int(rng.integers(0, len(ids_arr) - n_slots * text_len + 1))
            t.slots = shift + rng.permutation(n_slots).astype(np.int64) * text_len
        out.append(t)
    return out


def _window(t: _Tokenized, start: int, text_len: int) -> Window:
    stop = start + text_len
    # The gap before a token (a space some tokenizers leave out of its offsets) belongs
    # to it, so the text re-tokenizes to the same ids.
    char_start = int(t.starts[start])
    if start > 0:
        char_start = min(char_start, int(t.ends[start - 1]))
    char_end = int(t.ends[start:stop].max())
    return Window(
        t.doc.source,
        t.doc.doc_id,
        char_start,
        char_end,
        t.ids[start:stop].copy(),
        t.doc.text[char_start:char_end],
    )


def cut_windows(
    kept: list[Document],
    needed: int,
    tokenizer,
    text_len: int,
    seed: int,
    seen: set[bytes],
) -> tuple[list[Window], int]:
    """Up to `needed` new windows from `kept` (priority order); returns (windows, tokenized).

    `seen` holds the token bytes of windows already taken (other sources); it is not
    modified here so that a pass that falls short can be redone with more documents.
    """
    taken: set[bytes] = set()
    windows: list[Window] = []
    done: list[_Tokenized] = []

    def take(t: _Tokenized, slot: int) -> None:
        start = int(t.slots[slot])
        key = t.ids[start : start + text_len].tobytes()
        if key in seen or key in taken:
            return
        taken.add(key)
        windows.append(_window(t, start, text_len))

    # Round 1, lazily: tokenize only as many documents as one window each needs.
    for i in range(0, len(kept), TOKENIZE_BATCH):
        if len(windows) >= needed:
            break
        for t in _tokenize(tokenizer, kept[i : i + TOKENIZE_BATCH], seed, text_len):
            done.append(t)
            if len(windows) < needed and t.capacity:
                take(t, 0)
    # Later rounds only when every kept document has given its first window.
    rnd = 1
    while len(windows) < needed:
        rows = [t for t in done if t.capacity > rnd]
        if not rows:
            break
        for t in rows:
            take(t, rnd)
            if len(windows) >= needed:
                break
        rnd += 1
    return windows, len(done)


def sample_source(
    cfg: Config, source: str, needed: int, tokenizer, text_len: int, seen: set[bytes]
) -> list[Window]:
    """`needed` windows from one source (fewer only when the whole source is too small)."""
    t0 = time.time()
    keep = 2 * needed + 64
    while True:
        kept, scanned, eligible = scan_source(cfg, source, keep, text_len)
        windows, tokenized = cut_windows(kept, needed, tokenizer, text_len, cfg.seed, seen)
        if len(windows) >= needed or eligible <= keep:
            break
        log.info(
            "%s: %d kept docs gave %d of %d windows; rescanning keeping %d docs",
            source, len(kept), len(windows), needed, 4 * keep,
        )  # fmt: skip
        keep *= 4
    seen.update(w.tokens.tobytes() for w in windows)
    dt = max(time.time() - t0, 1e-9)
    log.info(
        "%s: scanned %d docs (%d long enough), kept %d, tokenized %d, made %d windows of "
        "%d tokens in %.1fs (%.0f windows/s)",
        source, scanned, eligible, len(kept), tokenized, len(windows), text_len, dt,
        len(windows) / dt,
    )  # fmt: skip
    return windows


def sample_windows(cfg: Config, tokenizer, bos: int | None) -> pd.DataFrame:
    """The window table every later stage reads (see COLUMNS).

    `tokens` holds `window_len` int32 ids: `bos` (when not None) then the text tokens;
    `text` is `doc.text[char_start:char_end]`, the span those text tokens cover.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "key 'model': window sampling needs a fast (Rust) tokenizer for character "
            f"offsets; {type(tokenizer).__name__} is not one"
        )
    t0 = time.time()
    sources = source_list(cfg)
    text_len = cfg.window_len - (1 if bos is not None else 0)
    seen: set[bytes] = set()
    windows: list[Window] = []
    short: dict[int, int] = {}
    for i, (source, needed) in enumerate(
        zip(sources, source_shares(cfg.windows, len(sources)), strict=True)
    ):
        if needed == 0:
            continue
        got = sample_source(cfg, source, needed, tokenizer, text_len, seen)
        if len(got) < needed:
            short[i] = len(got)
        windows.extend(got)
    if short:
        raise too_small_error(cfg, sources, short)
    df = to_frame(windows, bos)
    log.info("sampled %d windows from %s in %.1fs", len(df), ", ".join(sources), time.time() - t0)
    return df


def to_frame(windows: list[Window], bos: int | None) -> pd.DataFrame:
    """Windows -> the sorted, typed table with `window_id` 0..n-1."""
    windows = sorted(windows, key=lambda w: (w.source, w.doc_id, w.char_start))
    prefix = np.array([] if bos is None else [bos], dtype=np.int32)
    df = pd.DataFrame(
        {
            "window_id": np.arange(len(windows), dtype=np.int64),
            "source": pd.Series([w.source for w in windows], dtype=object),
            "doc_id": pd.Series([w.doc_id for w in windows], dtype=object),
            "char_start": np.array([w.char_start for w in windows], dtype=np.int64),
            "char_end": np.array([w.char_end for w in windows], dtype=np.int64),
            "tokens": pd.Series(
                [np.concatenate([prefix, w.tokens]) for w in windows], dtype=object
            ),
            "text": pd.Series([w.text for w in windows], dtype=object),
        },
        columns=COLUMNS,
    )
    return df
