"""Pair-scoring candidates (cache side) and the marked pairs of each scoring excerpt
(select side); pair_scoring.py judges them. Kept apart so that editing the scoring
code does not rerun the cache stage.

Per random window and head, for every destination t, `candidate_pairs` records the
attention write attn[t,s] * ||v[s] W_O|| of the template pairs (previous token, the
token itself, the latest earlier copy, the token after the latest earlier copy) and of
one random earlier non-BOS source. `mark_pairs` then picks, inside each scoring
excerpt, the positive (a held-out top event's main source) or up to N_EASY easy and
N_HARD hard negatives, all with a write below EASY_FRACTION x the head's largest.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

EASY_FRACTION = 0.1
N_EASY = 3  # easy negatives marked per random excerpt
N_HARD = 3  # hard negatives marked per random excerpt
PAIRS_COLUMNS = [
    "layer",
    "head",
    "window_id",
    "rand_src",
    "rand_write",
    "prev_write",
    "self_write",
    "dup_src",
    "dup_write",
    "ind_src",
    "ind_write",
]  # fmt: skip  (pairs.parquet, one row per head and random window, lists over positions)


def candidate_pairs(
    pattern: torch.Tensor, vnorm: torch.Tensor, tokens: torch.Tensor, rng: np.random.Generator
) -> list[dict[str, np.ndarray]]:
    """Per head (pattern [h, T, S], vnorm [h, S], tokens [T]): for every destination t
    the write of (t, t-1), (t, t), (t, latest earlier copy), (t, latest token after an
    earlier copy) and (t, one random earlier non-BOS source); -1 / NaN where none."""
    h, n, _ = pattern.shape
    pair = (pattern * vnorm[:, None, :]).float().cpu().numpy()  # [h, T, S]
    tok = tokens.cpu().numpy()
    t = np.arange(n)
    prev_src = np.where(t >= 2, t - 1, -1)
    dup_src = np.full(n, -1)
    ind_src = np.full(n, -1)
    for d in range(2, n):
        same = np.nonzero(tok[1:d] == tok[d])[0] + 1
        if len(same):
            dup_src[d] = same[-1]
        after = np.nonzero(tok[1 : d - 1] == tok[d])[0] + 2  # s-1 is the copy, s < d
        if len(after):
            ind_src[d] = after[-1]
    rand_src = np.array([int(rng.integers(1, d)) if d >= 2 else -1 for d in range(n)])

    def take(src: np.ndarray) -> np.ndarray:
        out = np.full((h, n), np.nan, dtype=np.float32)
        ok = src >= 0
        out[:, ok] = pair[:, t[ok], src[ok]]
        return out

    prev, self_, dup, ind, rand = (take(s) for s in (prev_src, t, dup_src, ind_src, rand_src))
    return [
        dict(
            rand_src=rand_src.astype(np.int32),
            rand_write=rand[i],
            prev_write=prev[i],
            self_write=self_[i],
            dup_src=dup_src.astype(np.int32),
            dup_write=dup[i],
            ind_src=ind_src.astype(np.int32),
            ind_write=ind[i],
        )  # fmt: skip
        for i in range(h)
    ]


def template_source(template: str, cand: Any, d: int) -> tuple[int, float]:
    """(source, write) of destination d's pair under `template` ((-1, nan) if none)."""
    if template == "previous_token":
        return (d - 1, float(cand.prev_write[d])) if d >= 2 else (-1, math.nan)
    if template == "self":
        return d, float(cand.self_write[d])
    if template == "duplicate_token":
        return int(cand.dup_src[d]), float(cand.dup_write[d])
    if template == "induction":
        return int(cand.ind_src[d]), float(cand.ind_write[d])
    return -1, math.nan


def mark_pairs(
    ev: Any, cand: Any | None, head_max: float, template: str, rng: np.random.Generator,
    window_top: list | None = None,
) -> dict[str, list]:  # fmt: skip
    """The marked pairs of one scoring excerpt (indices into the excerpt).

    A held-out top excerpt marks a positive for its event and for every other top event
    of the head in that window (`window_top`, all held out too) whose destination it shows.
    """
    start, end = int(ev.excerpt_start), int(ev.excerpt_end)
    dests, srcs, labels, writes = [], [], [], []
    if ev.split == "score_top":
        for top in [ev, *(window_top or [])]:
            d, s = int(top.pos), int(top.src_pos[0])
            # The main source only: an event whose main source is BOS or lies before the
            # excerpt marks nothing (a runner-up source would be a different pair, often
            # the token itself, and would misstate what the head reads).
            if not (start <= d < end and start <= s < end) or (d - start) in dests:
                continue
            dests.append(d - start)
            srcs.append(s - start)
            labels.append("pos")
            writes.append(float(top.src_write[0]))
    elif cand is not None:
        limit = EASY_FRACTION * head_max
        easy, hard = [], []
        for d in range(start, end):
            s, w = int(cand.rand_src[d]), float(cand.rand_write[d])
            if s >= start and w < limit:
                easy.append((d, s, w))
            s, w = template_source(template, cand, d)
            if s >= start and np.isfinite(w) and w < limit:
                hard.append((d, s, w))
        for label, found, n in (("easy", easy, N_EASY), ("hard", hard, N_HARD)):
            for i in sorted(rng.permutation(len(found))[:n].tolist()):
                d, s, w = found[i]
                dests.append(d - start)
                srcs.append(s - start)
                labels.append(label)
                writes.append(w)
    return dict(
        pair_dest=np.asarray(dests, dtype=np.int32), pair_src=np.asarray(srcs, dtype=np.int32),
        pair_label=list(labels), pair_write=np.asarray(writes, dtype=np.float32),
    )  # fmt: skip
