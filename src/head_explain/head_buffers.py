"""The cache stage's bounded state per layer: fixed-size candidate buffers of each
head's top events (merged in place, never grown) and the running sums of its
natural-text statistics, and how both become rows at the end.

Memory: heads × (candidates + batch_size·max_events_per_window) slots, each with its
window's activations in float16: allocated on a layer's first batch, then reused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class HeadTop:
    """Candidate buffers of the heads of one layer: [h, slots, ...] on the model device.

    The first `candidates` slots hold the running top; new candidates are written
    after them and one topk merges both, in place. Allocated once: no growth.
    """

    vals: torch.Tensor  # [h, S] float32, -inf = empty slot
    win: torch.Tensor  # [h, S] int64
    pos: torch.Tensor  # [h, S] int64
    src_pos: torch.Tensor  # [h, S, k]
    src_attn: torch.Tensor  # [h, S, k]
    src_write: torch.Tensor  # [h, S, k]
    acts: torch.Tensor  # [h, S, T] float16: the candidate's whole window


@dataclass
class HeadStats:
    act_sum: torch.Tensor
    act_max: torch.Tensor
    n: torch.Tensor
    bos: torch.Tensor
    dist: torch.Tensor
    prev: torch.Tensor
    dup: torch.Tensor
    dup_n: torch.Tensor
    ind: torch.Tensor
    ind_n: torch.Tensor


def new_top(s, h: int, n: int, ks: int, dev: torch.device) -> HeadTop:
    """Empty buffers (allocated once) for `h` heads of windows of `n` tokens."""
    slots = s.candidates + s.batch_size * events_per_window(s, n)

    def empty(*shape, dtype=torch.float32):
        return torch.zeros((h, slots, *shape), device=dev, dtype=dtype)

    top = HeadTop(
        vals=torch.full((h, slots), float("-inf"), device=dev),
        win=empty(dtype=torch.long), pos=empty(dtype=torch.long),
        src_pos=empty(ks, dtype=torch.long), src_attn=empty(ks), src_write=empty(ks),
        acts=empty(n, dtype=torch.float16),
    )  # fmt: skip
    return top


def first_event_pos(s, n: int) -> int:
    """The earliest destination of an event in windows of n tokens: never the first
    token, and not before `s.min_event_pos` (see config.min_event_pos)."""
    return max(1, min(s.min_event_pos, n - 1))


def events_per_window(s, n: int) -> int:
    return min(s.max_events_per_window, n - first_event_pos(s, n))


def update_top(top: HeadTop, s, act, vnorm, pattern, win_ids) -> None:
    """Merge one batch's candidates (the top `max_events_per_window` tokens of each
    window and head from `first_event_pos` on) into the running top, in place."""
    b, h, n = act.shape
    k = events_per_window(s, n)
    ks = min(s.top_sources, n)
    masked = act.clone()
    masked[:, :, : first_event_pos(s, n)] = float("-inf")
    vals, pos = masked.topk(k, dim=-1)  # [b, h, k]
    rows = torch.gather(
        pattern, 2, pos[..., None].expand(b, h, k, pattern.shape[-1])
    )  # [b, h, k, S]
    src_write, src_pos = (rows * vnorm[:, :, None, :]).topk(ks, dim=-1)
    src_attn = torch.gather(rows, -1, src_pos)

    # candidates [h, b*k, ...]
    def flat(t):
        return t.permute(1, 0, 2, *range(3, t.dim())).reshape(h, b * k, *t.shape[3:])

    c = s.candidates
    new = dict(
        vals=flat(vals), win=flat(win_ids[:, None, None].expand(b, h, k)), pos=flat(pos),
        src_pos=flat(src_pos), src_attn=flat(src_attn), src_write=flat(src_write),
        acts=flat(act[:, :, None, :].expand(b, h, k, n)),
    )  # fmt: skip
    for name, value in new.items():  # write after the kept top (a short last batch
        buf = getattr(top, name)  # leaves -inf slots that never win)
        buf[:, c : c + b * k] = value
        buf[:, c + b * k :] = float("-inf") if name == "vals" else 0
    keep = top.vals.topk(c, dim=1).indices  # [h, C]
    for f in fields(HeadTop):
        buf = getattr(top, f.name)
        index = keep.view(h, c, *([1] * (buf.dim() - 2))).expand(h, c, *buf.shape[2:])
        buf[:, :c] = torch.gather(buf, 1, index)


def update_stats(stats: dict[int, HeadStats], layer: int, act, pattern, dup, ind) -> None:
    """Add one batch's natural-text sums of the heads of `layer` to `stats[layer]`."""
    b, h, n, _ = pattern.shape
    pos = torch.arange(n, device=act.device)
    a = act[:, :, 1:]  # dest 0 is BOS: it attends only to itself
    # Σ_{b,t,s} p·max(t-s, 0) as one contraction: no [b, h, T, S] temporaries.
    dist = (pos[:, None] - pos[None, :]).clamp(min=0).float()
    dist_sum = torch.einsum("bhts,ts->h", pattern, dist)
    # dup/ind are sparse: sum p over their (b, t, s) pairs (dest 0 has none).
    db, dt, ds = dup.nonzero(as_tuple=True)
    ib, it, is_ = ind.nonzero(as_tuple=True)
    prev = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)[:, :, 1:]  # t>=2
    new = HeadStats(
        act_sum=a.sum((0, 2)).double(),
        act_max=a.amax((0, 2)),
        n=torch.full((h,), a.shape[0] * a.shape[2], device=a.device, dtype=torch.float64),
        bos=pattern[:, :, 1:, 0].sum((0, 2)).double(),
        dist=dist_sum.double(),
        prev=prev.sum((0, 2)).double(),
        dup=pattern[db, :, dt, ds].sum(0).double(),
        dup_n=dup[:, 1:].any(-1).sum().double().expand(h).clone(),
        ind=pattern[ib, :, it, is_].sum(0).double(),
        ind_n=ind[:, 1:].any(-1).sum().double().expand(h).clone(),
    )
    old = stats.get(layer)
    if old is None:
        stats[layer] = new
        return
    for f in fields(HeadStats):
        a_old, a_new = getattr(old, f.name), getattr(new, f.name)
        merged = torch.maximum(a_old, a_new) if f.name == "act_max" else a_old + a_new
        setattr(old, f.name, merged)


def stats_rows(layer: int, hs: list[int], st: HeadStats, n_tokens: int) -> list[dict]:
    """head_stats.parquet rows of the heads of one layer."""
    n, dup_n, ind_n = (t.cpu().numpy() for t in (st.n, st.dup_n, st.ind_n))
    rows = []
    for hi, head in enumerate(hs):
        # prev-token counts dest 2.. (dest 1's previous token is BOS): (T-2)/(T-1)
        n_prev = n[hi] * (n_tokens - 2) / max(1, n_tokens - 1)
        rows.append(
            dict(
                layer=layer, head=head,
                mean_act=float(st.act_sum[hi] / n[hi]),
                max_act=float(st.act_max[hi]),
                bos_frac=float(st.bos[hi] / n[hi]),
                mean_attn_dist=float(st.dist[hi] / n[hi]),
                prev_token=float(st.prev[hi] / max(n_prev, 1)),
                duplicate_token=float(st.dup[hi] / dup_n[hi]) if dup_n[hi] else float("nan"),
                induction=float(st.ind[hi] / ind_n[hi]) if ind_n[hi] else float("nan"),
                n_events=int(n[hi]),
            )
        )  # fmt: skip
    return rows
