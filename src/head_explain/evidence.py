"""Evidence per head from its strongest events, and the plain words an explainer gets.

For each head, over its `topk` top events (the select stage's pool), the *main source*
of an event is its first source by attention write (src_pos[0]). evidence.parquet, one
row per analysed head:

- n_events; share_offset_0 .. share_offset_{MAX_SHOWN_OFFSET}: share of events whose
  main source is that many tokens back (0 = the destination itself), share_offset_far
  (further back, BOS excluded); share_bos (main source is BOS / position 0);
  share_dup (an earlier copy of the destination token); share_induction (the token
  after an earlier copy); a copy is the same word, case and surrounding space aside
  (`word_key`); main_offset and its share.
- top_dest / top_src / top_pair (list<str>, "x -> y" for pairs) with *_count
  (list<int>) and *_lift (list<float>): the most frequent tokens and pairs, lift = their
  share among the events / their share in the corpus windows (for a pair, over the
  product of the two token shares).
- head_class, class_score, second_class copied from head_types.parquet, and
  pair_template: the template the hard negatives of pair scoring fit (the class's
  own; for bos_sink and content heads, the template with the largest share here).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from head_explain.heads import head_name

log = logging.getLogger(__name__)

MAX_SHOWN_OFFSET = 4
FIRST = "[first token]"  # how BOS is named in the evidence
TOP_N = 5
TEMPLATE_WORDS = {
    "previous_token": "the previous token",
    "self": "the current token itself",
    "duplicate_token": "an earlier copy of the current token",
    "induction": "the token that followed an earlier copy of the current token",
    "bos_sink": "the first token of the text",
}
PAIR_TEMPLATES = ("previous_token", "self", "duplicate_token", "induction")


def word_key(text: str) -> str:
    """What makes two tokens copies of one word: their text without leading or trailing
    whitespace, lower-cased (a whitespace-only token is its own key). A copy head reads
    " Shared" from "shared" and "bits" from " bits" as it reads exact repeats; on the
    bundled model's duplicate heads the template's easy pair-AUC is 0.917 with word
    copies, 0.865 with exact ids (benchmarks/bench_quality.py)."""
    return text.strip().lower() or text


def main_source_kinds(words: list[str], dest: int, src: int) -> dict[str, bool]:
    """Which templates one (destination, main source) pair fits; `words` are the
    window's word keys (`word_key` of each token)."""
    return {
        "bos": src == 0,
        "dup": 1 <= src < dest and words[src] == words[dest],
        "induction": 2 <= src < dest and words[src - 1] == words[dest],
    }


def _frequent(counter: Counter, n_events: int, base: dict, n: int = TOP_N):
    items = counter.most_common(n)
    lift = [round((c / n_events) / max(base.get(k, 0.0), 1e-9), 2) for k, c in items]
    return [k for k, _ in items], [int(c) for _, c in items], lift


def head_evidence(
    top: pd.DataFrame, tokens_by_window: dict, token_text, unigram: dict[int, float],
    words: dict[int, list[str]] | None = None,
) -> dict:  # fmt: skip
    """One evidence row from one head's top events (window_id, pos, src_pos). `words`
    (window -> word keys) is filled as windows come; pass one dict for all heads so a
    window shared by many heads is decoded once."""
    n = len(top)
    offsets: Counter = Counter()
    bos = dup = ind = 0
    dests: Counter = Counter()
    srcs: Counter = Counter()
    pairs: Counter = Counter()
    words = {} if words is None else words
    for ev in top.itertuples(index=False):
        toks = tokens_by_window[ev.window_id]
        if ev.window_id not in words:
            words[ev.window_id] = [word_key(token_text(int(t))) for t in toks]
        d, s = int(ev.pos), int(ev.src_pos[0])
        kinds = main_source_kinds(words[ev.window_id], d, s)
        bos += kinds["bos"]
        dup += kinds["dup"]
        ind += kinds["induction"]
        if s > 0:
            offsets[min(d - s, MAX_SHOWN_OFFSET + 1)] += 1
        dests[int(toks[d])] += 1
        srcs[int(toks[s])] += 1
        pairs[(int(toks[d]), int(toks[s]))] += 1
    first = {int(toks[0]) for toks in tokens_by_window.values()}  # BOS id(s)
    row: dict = {"n_events": n}
    for k in range(MAX_SHOWN_OFFSET + 1):
        row[f"share_offset_{k}"] = offsets[k] / n if n else np.nan
    row["share_offset_far"] = offsets[MAX_SHOWN_OFFSET + 1] / n if n else np.nan
    row["share_bos"] = bos / n if n else np.nan
    row["share_dup"] = dup / n if n else np.nan
    row["share_induction"] = ind / n if n else np.nan
    main = max(range(MAX_SHOWN_OFFSET + 1), key=lambda k: offsets[k]) if n else 0
    row["main_offset"], row["main_offset_share"] = main, (offsets[main] / n if n else np.nan)
    pair_base = {(a, b): unigram.get(a, 0) * unigram.get(b, 0) for a, b in pairs}
    for name, counter, base in (("dest", dests, unigram), ("src", srcs, unigram),
                                ("pair", pairs, pair_base)):  # fmt: skip
        keys, counts, lift = _frequent(counter, max(n, 1), base)
        text = lambda t: FIRST if t in first else _show(token_text(t))  # noqa: E731
        if name == "pair":
            keys = [f"{text(a)} -> {text(b)}" for a, b in keys]
        else:
            keys = [text(k) for k in keys]
        row[f"top_{name}"], row[f"top_{name}_count"], row[f"top_{name}_lift"] = keys, counts, lift
    return row


def _show(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\t", "\\t").strip() or repr(tok)


def pair_template(head_class: str, row: dict) -> str:
    """The template whose pairs are the head's hard negatives."""
    return head_class if head_class in PAIR_TEMPLATES else commonest_template(row)[0]


def commonest_template(row: dict) -> tuple[str, float]:
    """The template whose source is the main source of most of the head's top events,
    and that share (previous token, the token itself, an earlier copy, after a copy)."""
    shares = {
        "previous_token": row["share_offset_1"], "self": row["share_offset_0"],
        "duplicate_token": row["share_dup"], "induction": row["share_induction"],
    }  # fmt: skip
    shares = {k: (0.0 if pd.isna(v) else float(v)) for k, v in shares.items()}
    best = max(shares, key=lambda k: shares[k])
    return best, shares[best]


def unigram_shares(windows: pd.DataFrame) -> dict[int, float]:
    """Token id -> its share of all window tokens (BOS included, so a head that reads
    BOS in every event has lift = window length)."""
    counts = Counter(int(t) for toks in windows["tokens"] for t in list(toks))
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in counts.items()}


def build_evidence(
    pools: dict[tuple[int, int], pd.DataFrame],
    windows: pd.DataFrame,
    token_text,
    types: pd.DataFrame | None,
) -> pd.DataFrame:
    """evidence.parquet from each head's top-event pool (see the module doc)."""
    tokens_by_window = {int(w): np.asarray(t) for w, t in zip(windows["window_id"], windows["tokens"], strict=True)}  # fmt: skip
    unigram = unigram_shares(windows)
    by_head = {} if types is None else {(int(r.layer), int(r.head)): r for r in types.itertuples()}
    rows = []
    words: dict[int, list[str]] = {}  # word keys of each window, shared by all heads
    for (layer, head), top in sorted(pools.items()):
        row = dict(layer=layer, head=head, head_name=head_name(layer, head))
        row |= head_evidence(top, tokens_by_window, token_text, unigram, words)
        t = by_head.get((layer, head))
        row["head_class"] = t.head_class if t is not None else "content"
        row["class_score"] = float(t.class_score) if t is not None else np.nan
        row["second_class"] = t.second_class if t is not None else ""
        row["top_offset"] = int(t.top_offset) if t is not None else 0
        row["pair_template"] = pair_template(row["head_class"], row)
        rows.append(row)
    return pd.DataFrame(rows)


def _pct(x: float) -> str:
    return f"{round(100 * x)}%"


def evidence_text(ev: dict) -> str:
    """The short plain-language block prompt v2 puts before the excerpts."""
    cls = ev["head_class"]
    n = int(ev["n_events"])
    where = {
        "the previous token": ev["share_offset_1"], "the current token itself": ev["share_offset_0"],
        "an earlier copy of the current token": ev["share_dup"],
        "the token after an earlier copy of the current token": ev["share_induction"],
        "the first token of the text": ev["share_bos"],
    }  # fmt: skip
    ranked = sorted(((v, k) for k, v in where.items() if v and v > 0), reverse=True)[:3]
    lines = [
        f"Pattern class measured on all text: {cls.replace('_', ' ')}"
        + (f" ({TEMPLATE_WORDS[cls]})" if cls in TEMPLATE_WORDS else "")
        + f", score {ev['class_score']:.2f}."
    ]
    if ranked:
        lines.append(
            f"In its {n} strongest events the head mostly reads "
            + "; ".join(f"{k} ({_pct(v)})" for v, k in ranked)
            + "."
        )
    if len(ev["top_dest"]):
        lines.append("Frequent destination tokens: " + _list(ev["top_dest"], ev["top_dest_count"]))
        lines.append("Frequent source tokens: " + _list(ev["top_src"], ev["top_src_count"]))
    return "\n".join(lines)


def _list(keys, counts) -> str:
    return ", ".join(f'"{k}" ({c})' for k, c in zip(list(keys)[:4], list(counts)[:4], strict=False))


def read_evidence(path: Path, model: str) -> pd.DataFrame:
    """evidence.parquet, or no rows (with a warning) in an outdir made without it: the
    explainer then gets no evidence block and pair scoring no class template."""
    from head_explain import artifacts as art

    if not Path(path).exists():
        log.warning("%s is missing: explaining and scoring without head evidence", path)
        return pd.DataFrame(columns=["layer", "head", "head_class", "pair_template"])
    return art.read_parquet(path, {"model": model})[0]
