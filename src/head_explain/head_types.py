"""Head taxonomy: every head of the model classified by its attention pattern.

Two measurements per head, both from `blocks.L.attn.hook_pattern` of every layer in
one forward pass (each hook reduces its own layer, so hook order does not matter):

- Synthetic (TransformerLens `detect_head`, Olsson et al. 2022): BOS + a seeded random
  token sequence of `SYN_HALF` tokens repeated twice, `SYN_SEQS` sequences. Over the
  second half: mean attention on the previous token (`syn_prev`), on the earlier copy
  of the destination token (`syn_duplicate`) and on the token after that copy
  (`syn_induction`).
- Natural text (the first `type_windows` sampled windows), over destinations t >= 1:
  previous token (`nat_prev`, t >= 2 so BOS is not counted twice), the token itself
  (`nat_self`), BOS (`nat_bos`), earlier copies of the token (`nat_duplicate`) and the
  tokens after them (`nat_induction`; both over destinations that have one), the mean
  attention at each relative offset 0..MAX_OFFSET (the largest one is `top_offset` with
  its mean attention `top_offset_share`), and the mean attention distance.

Class rule (thresholds are config keys, each in [0, 1]); a template *fires* when its
score reaches its threshold:
  previous_token  mean(syn_prev, nat_prev)      >= class_previous_token
  induction       syn_induction                 >= class_induction
  duplicate_token syn_duplicate                 >= class_duplicate_token
  self            nat_self                      >= class_self
  fixed_offset    top_offset_share, offset >= 2 >= class_fixed_offset
  bos_sink        nat_bos                       >= class_bos_sink
head_class is the firing template with the highest score, bos_sink only when no other
fires (a sink is where a head parks attention it does not use, so a head with a real
template besides its sink is that template). second_class is the next firing template.
Nothing fires: `content`, and class_score is the highest template score (below its
threshold), saying how far the head is from every template.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from head_explain.attention_math import token_masks
from head_explain.heads import head_name

log = logging.getLogger(__name__)

CLASSES = (
    "previous_token", "induction", "duplicate_token", "self", "fixed_offset", "bos_sink",
    "content",
)  # fmt: skip
SYN_SEQS = 8
SYN_HALF = 24
MAX_OFFSET = 8  # relative offsets measured on natural text: 0 (self) .. MAX_OFFSET
SCORE_COLUMNS = [
    "syn_prev", "syn_duplicate", "syn_induction", "nat_prev", "nat_self", "nat_bos",
    "nat_duplicate", "nat_induction", "top_offset", "top_offset_share", "mean_attn_dist",
]  # fmt: skip


@dataclass(frozen=True)
class Thresholds:
    previous_token: float = 0.4
    induction: float = 0.3
    duplicate_token: float = 0.3
    self: float = 0.3
    fixed_offset: float = 0.3
    bos_sink: float = 0.8


def synthetic_sequences(
    vocab_size: int, bos: int | None, n_seqs: int = SYN_SEQS, half: int = SYN_HALF, seed: int = 0
) -> np.ndarray:
    """[n_seqs, 1 + 2*half] token ids: BOS, then `half` distinct random tokens twice.

    Tokens are distinct within a half so the only duplicates are the repeat. Low ids
    (special and byte tokens in most vocabularies) are avoided where the vocabulary
    allows it.
    """
    low = min(1000, vocab_size // 4)
    rng = np.random.default_rng([seed, 8])
    rows = []
    for _ in range(n_seqs):
        half_ids = rng.choice(np.arange(low, vocab_size), size=half, replace=False)
        start = [bos] if bos is not None else [int(rng.integers(low, vocab_size))]
        rows.append(np.concatenate([start, half_ids, half_ids]))
    return np.stack(rows).astype(np.int64)


def synthetic_scores(pattern: torch.Tensor, half: int) -> dict[str, torch.Tensor]:
    """Per-head sums over the second half [h]: prev, duplicate, induction (and count).

    Sequence i of length 1 + 2*half: destination t = half+1+j copies position 1+j.
    """
    b, h, n, _ = pattern.shape
    t = torch.arange(half + 1, n, device=pattern.device)
    rows = pattern[:, :, t, :]  # [b, h, half, S]
    pick = lambda src: rows.gather(-1, src.view(1, 1, -1, 1).expand(b, h, -1, 1))[..., 0]  # noqa: E731
    return {
        "syn_prev": pick(t - 1).sum((0, 2)).double(),
        "syn_duplicate": pick(t - half).sum((0, 2)).double(),
        "syn_induction": pick(t - half + 1).sum((0, 2)).double(),
        "syn_n": torch.full((h,), float(b * len(t)), dtype=torch.float64),
    }


def natural_scores(pattern: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-head sums over destinations t >= 1 of a batch of windows (BOS at 0)."""
    b, h, n, _ = pattern.shape
    p = pattern[:, :, 1:, :]  # [b, h, n-1, S]
    pos = torch.arange(n, device=pattern.device)
    dup, ind = token_masks(tokens)
    dup_has, ind_has = dup[:, 1:].any(-1), ind[:, 1:].any(-1)  # [b, n-1]
    dist = (pos[1:, None] - pos[None, :]).clamp(min=0).float()
    offsets = []
    for k in range(MAX_OFFSET + 1):  # offset k, source >= 1 (BOS is the sink's own score)
        diag = torch.diagonal(pattern, offset=-k, dim1=-2, dim2=-1)  # [b, h, n-k], dest t=s+k
        offsets.append(diag[..., 1:].sum((0, 2)).double())
    counts = torch.tensor([float(b * max(0, n - 1 - k)) for k in range(MAX_OFFSET + 1)])
    return {
        "nat_prev": torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)[..., 1:]
        .sum((0, 2))
        .double(),
        "prev_n": torch.full((h,), float(b * (n - 2)), dtype=torch.float64),
        "nat_self": torch.diagonal(p, offset=1, dim1=-2, dim2=-1).sum((0, 2)).double(),
        "nat_bos": p[..., 0].sum((0, 2)).double(),
        "nat_n": torch.full((h,), float(b * (n - 1)), dtype=torch.float64),
        "nat_duplicate": ((p * dup[:, None, 1:]).sum(-1) * dup_has[:, None]).sum((0, 2)).double(),
        "dup_n": dup_has.sum().double().expand(h).clone(),
        "nat_induction": ((p * ind[:, None, 1:]).sum(-1) * ind_has[:, None]).sum((0, 2)).double(),
        "ind_n": ind_has.sum().double().expand(h).clone(),
        "dist": (p * dist).sum(-1).sum((0, 2)).double(),
        "offset_sum": torch.stack(offsets, 1),  # [h, K+1]
        "offset_n": counts.double().expand(h, -1).clone(),
    }


class _PatternReducer:
    """Hooks on every layer's pattern; each call adds its layer's sums (order-free)."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.reduce = None  # set per batch: pattern -> dict of sums

    def hook(self, layer: int, pattern: torch.Tensor, hook) -> torch.Tensor:
        new = {k: v.cpu() for k, v in self.reduce(pattern.detach().float()).items()}
        old = self.sums.get(layer)
        self.sums[layer] = new if old is None else {k: old[k] + new[k] for k in old}
        return pattern

    def hooks(self):
        return [
            (f"blocks.{layer}.attn.hook_pattern", partial(self.hook, layer))
            for layer in range(self.n_layers)
        ]


def _run(bridge, reducer: _PatternReducer, tokens: np.ndarray, reduce_fn, bs: int, desc: str):
    device = next(bridge.parameters()).device
    with torch.inference_mode():
        for i in tqdm(range(0, len(tokens), bs), desc=desc, unit="batch", leave=False):
            tok = torch.as_tensor(tokens[i : i + bs], device=device).long()
            reducer.reduce = partial(reduce_fn, tokens=tok)
            # stop after the last block: the unembedding (~1/8 of the cost here) is not needed
            bridge.run_with_hooks(
                tok, fwd_hooks=reducer.hooks(), return_type=None,
                stop_at_layer=reducer.n_layers,
            )  # fmt: skip


def measure_heads(
    bridge, windows: np.ndarray, bos: int | None, batch_size: int = 8, seed: int = 0
) -> pd.DataFrame:
    """Every template score of every head (one row per head), see the module doc."""
    t0 = time.time()
    cfg = bridge.cfg
    syn = synthetic_sequences(int(cfg.d_vocab), bos, seed=seed)
    syn_red, nat_red = _PatternReducer(cfg.n_layers), _PatternReducer(cfg.n_layers)
    _run(bridge, syn_red, syn, lambda p, tokens: synthetic_scores(p, SYN_HALF), batch_size,
         "head types: synthetic")  # fmt: skip
    _run(bridge, nat_red, windows, lambda p, tokens: natural_scores(p, tokens), batch_size,
         "head types: windows")  # fmt: skip
    for red in (syn_red, nat_red):
        if len(red.sums) != cfg.n_layers:
            raise RuntimeError(f"pattern hooks fired for {len(red.sums)}/{cfg.n_layers} layers")
    rows = []
    for layer in range(cfg.n_layers):
        s, n = syn_red.sums[layer], nat_red.sums[layer]
        off = (n["offset_sum"] / n["offset_n"].clamp(min=1)).numpy()  # [h, K+1]
        for head in range(cfg.n_heads):
            far = off[head, 2:]  # offsets >= 2: fixed offsets beyond self and previous
            k = int(np.argmax(far)) + 2 if far.size else 0
            rows.append(dict(
                layer=layer, head=head, head_name=head_name(layer, head),
                syn_prev=float(s["syn_prev"][head] / s["syn_n"][head]),
                syn_duplicate=float(s["syn_duplicate"][head] / s["syn_n"][head]),
                syn_induction=float(s["syn_induction"][head] / s["syn_n"][head]),
                nat_prev=float(n["nat_prev"][head] / max(float(n["prev_n"][head]), 1.0)),
                nat_self=float(n["nat_self"][head] / n["nat_n"][head]),
                nat_bos=float(n["nat_bos"][head] / n["nat_n"][head]),
                nat_duplicate=_ratio(n["nat_duplicate"][head], n["dup_n"][head]),
                nat_induction=_ratio(n["nat_induction"][head], n["ind_n"][head]),
                top_offset=k, top_offset_share=float(off[head, k]) if far.size else 0.0,
                mean_attn_dist=float(n["dist"][head] / n["nat_n"][head]),
                **{f"offset_{i}": float(off[head, i]) for i in range(off.shape[1])},
            ))  # fmt: skip
    log.info(
        "head types: %d heads on %d synthetic + %d natural sequences in %.1fs",
        len(rows), len(syn), len(windows), time.time() - t0,
    )  # fmt: skip
    return pd.DataFrame(rows)


def _ratio(num, den) -> float:
    return float(num / den) if float(den) > 0 else float("nan")


def template_scores(row) -> dict[str, float]:
    """The score each class's template gets for one head (see the rule above)."""
    return {
        "previous_token": float(np.nanmean([row["syn_prev"], row["nat_prev"]])),
        "induction": float(row["syn_induction"]),
        "duplicate_token": float(row["syn_duplicate"]),
        "self": float(row["nat_self"]),
        "fixed_offset": float(row["top_offset_share"]) if row["top_offset"] >= 2 else 0.0,
        "bos_sink": float(row["nat_bos"]),
    }


def classify(scores: pd.DataFrame, th: Thresholds) -> pd.DataFrame:
    """Add head_class, class_score and second_class (see the module doc for the rule)."""
    out = scores.copy()
    classes, values, seconds = [], [], []
    for _, row in out.iterrows():
        tmpl = template_scores(row)
        fired = sorted(
            (c for c, v in tmpl.items() if c != "bos_sink" and v >= getattr(th, c)),
            key=lambda c: -tmpl[c],
        )
        if tmpl["bos_sink"] >= th.bos_sink:
            fired.append("bos_sink")  # only first when nothing else fires
        if fired:
            classes.append(fired[0])
            values.append(tmpl[fired[0]])
            seconds.append(fired[1] if len(fired) > 1 else "")
        else:
            classes.append("content")
            values.append(max(tmpl.values()))
            seconds.append("")
    out.insert(3, "head_class", classes)
    out.insert(4, "class_score", np.round(values, 4))
    out.insert(5, "second_class", seconds)
    return out


def head_types(
    bridge, windows: np.ndarray, bos: int | None, th: Thresholds, batch_size: int = 8,
    seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    """head_types.parquet: every head's template scores and class."""
    return classify(measure_heads(bridge, windows, bos, batch_size, seed), th)


def choose_heads_by_class(types: pd.DataFrame, spread: list[tuple[int, int]], max_heads: int):
    """max_heads heads: the strongest head of each class first (class order of
    CLASSES), then the next strongest of each, once more, then `spread` (a spread over
    layers) fills the rest; sorted by (layer, head)."""
    picked: list[tuple[int, int]] = []
    ranked = {
        c: [
            (int(r.layer), int(r.head))
            for r in types[types["head_class"] == c]
            .sort_values("class_score", ascending=c == "content", kind="stable")
            .itertuples()
        ]
        for c in CLASSES
    }
    for rank in range(2):
        for c in CLASSES:
            if len(picked) < max_heads and rank < len(ranked[c]):
                picked.append(ranked[c][rank])
    for h in spread:
        if len(picked) >= max_heads:
            break
        if h not in picked:
            picked.append(h)
    return sorted(set(picked))
