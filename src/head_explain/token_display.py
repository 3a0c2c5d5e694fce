"""Tokens as the text they cover, never `�`.

A byte-level BPE tokenizer (GPT-2, SmolLM2) splits a multi-byte character (an accented
letter, a dash, CJK, an emoji) over several tokens; decoding one such token alone gives
`�`. Here the raw bytes of a run of tokens are fed through one incremental UTF-8
decoder: each token shows the characters that are complete once its bytes are in, so
joining the shown tokens gives the exact text, and a token holding only the first bytes
of a character shows ''. Bytes that never form a character (an excerpt that starts or
ends inside one) are shown as escapes like `\\xe2`.
"""

from __future__ import annotations

import codecs
import re
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for the 256 byte values, inverted."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The raw bytes each token stands for."""
    if _is_byte_level(tokenizer):
        table = _byte_decoder()
        pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
        out = []
        for tid, piece in zip(ids, pieces, strict=True):
            if piece is not None and all(ch in table for ch in piece):
                out.append(bytes(table[ch] for ch in piece))
            else:  # an added/special token outside the byte alphabet
                out.append(tokenizer.decode([int(tid)]).encode("utf-8"))
        return out
    out = []
    for tid in ids:
        piece = tokenizer.convert_ids_to_tokens(int(tid))
        m = _BYTE_TOKEN.match(piece or "")
        out.append(bytes([int(m.group(1), 16)]) if m else tokenizer.decode([int(tid)]).encode())
    return out


def display_tokens(tokenizer, ids) -> list[str]:
    """One display string per token of the run `ids` (see the module doc)."""
    ids = [int(i) for i in ids]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    shown = [decoder.decode(b) for b in token_bytes(tokenizer, ids)]
    if shown:
        shown[-1] += decoder.decode(b"", final=True)  # a cut-off last character, escaped
    return shown
