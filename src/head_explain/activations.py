"""Streaming head activations: hooks → per-head write norms, top events, statistics.

Activation of head h at destination token t is the norm of what the head writes into
the residual stream there, ‖z[t,h] · W_O[h]‖. For each kept event we also record the
top source positions s by their share of that write, attention[t,s] · ‖v[s] · W_O[h]‖
(OpenAI transformer-debugger's "attention write"), so an explainer can say
"attends from X to Y".

Memory is bounded independently of the number of windows: hooks keep one layer's
tensors at a time, and each head keeps only its `candidates` strongest events (at most
`max_events_per_window` per window) plus every token of a fixed set of random windows.
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

from head_explain.pair_candidates import PAIRS_COLUMNS, candidate_pairs

log = logging.getLogger(__name__)


@dataclass
class CacheSettings:
    candidates: int
    max_events_per_window: int
    top_sources: int
    batch_size: int
    random_window_ids: frozenset[int] = frozenset()
    seed: int = 0


@dataclass
class _HeadTop:
    """Running top candidates of the heads of one layer (tensors on the model device)."""

    vals: torch.Tensor  # [h, C]
    win: torch.Tensor  # [h, C]
    pos: torch.Tensor  # [h, C]
    src_pos: torch.Tensor  # [h, C, k]
    src_attn: torch.Tensor  # [h, C, k]
    src_write: torch.Tensor  # [h, C, k]
    acts: torch.Tensor  # [h, C, T] the candidate's whole window, for activations.parquet


@dataclass
class _HeadStats:
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


@dataclass
class CacheResult:
    raw_events: pd.DataFrame
    head_stats: pd.DataFrame
    activations: pd.DataFrame
    seconds: float = 0.0
    tokens: int = 0
    pairs: pd.DataFrame | None = None  # pair-scoring candidates of the random windows


def head_writes(
    pattern: torch.Tensor, z: torch.Tensor, v: torch.Tensor, w_o: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token write norms and per-source value-write norms for some heads of a layer.

    pattern [b, h, dest, src], z [b, pos, h, d_head], v [b, pos, h, d_head] (already
    expanded from KV heads), w_o [h, d_head, d_model].
    Returns act [b, h, dest] = ‖z·W_O‖ and vnorm [b, h, src] = ‖v·W_O‖.
    """
    act = torch.einsum("bphd,hdm->bhpm", z, w_o).norm(dim=-1)
    vnorm = torch.einsum("bphd,hdm->bhpm", v, w_o).norm(dim=-1)
    return act, vnorm


def token_masks(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Duplicate-token and induction masks [b, dest, src] measured on natural text.

    dup[t, s]: an earlier s (not BOS) holds the same token as t.
    ind[t, s]: the token before s equals the token at t (s is what followed t's
    previous occurrence), with s < t.
    """
    b, n = tokens.shape
    pos = torch.arange(n, device=tokens.device)
    earlier = pos[None, :] < pos[:, None]  # [dest, src]
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, dest, src]
    dup = same & earlier & (pos[None, :] >= 1)
    prev_same = torch.zeros_like(same)
    prev_same[:, :, 1:] = same[:, :, :-1]  # tokens[t] == tokens[s-1]
    ind = prev_same & earlier & (pos[None, :] >= 2)
    return dup, ind


def _layer_heads(heads: list[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, []).append(head)
    return out


class HeadActivationCache:
    """Streams windows through the model, keeping bounded per-head summaries."""

    def __init__(self, bridge, heads: list[tuple[int, int]], settings: CacheSettings):
        self.bridge = bridge
        self.settings = settings
        self.by_layer = _layer_heads(heads)
        cfg = bridge.cfg
        self.n_heads = cfg.n_heads
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.kv_group = cfg.n_heads // n_kv
        self.device = next(bridge.parameters()).device
        self.w_o = {
            layer: bridge.W_O[layer, hs].detach().float().to(self.device)
            for layer, hs in self.by_layer.items()
        }
        self.top: dict[int, _HeadTop | None] = dict.fromkeys(self.by_layer)
        self.stats: dict[int, _HeadStats] = {}
        self.random_rows: list[tuple[int, int, int, np.ndarray]] = []
        self.random_events: list[dict] = []
        self.random_pairs: list[dict] = []
        self._tmp: dict[str, torch.Tensor] = {}
        self._batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.rng = np.random.default_rng(settings.seed)

    # ---------------------------------------------------------------- hooks
    def _hooks(self):
        hooks = []
        for layer in self.by_layer:
            # Alias hook names resolve to other names (hook_v -> v.hook_out): key by role.
            hooks.append((f"blocks.{layer}.attn.hook_v", partial(self._keep, "v")))
            hooks.append((f"blocks.{layer}.attn.hook_pattern", partial(self._keep, "pattern")))
            hooks.append((f"blocks.{layer}.attn.hook_z", self._on_z))
        return hooks

    def _keep(self, role, tensor, hook):
        self._tmp[role] = tensor.detach()
        return tensor

    def _on_z(self, tensor, hook):
        layer = int(hook.name.split(".")[1])
        self._process_layer(layer, self._tmp.pop("pattern"), tensor.detach(), self._tmp.pop("v"))
        return tensor

    # ---------------------------------------------------------------- maths
    def _process_layer(self, layer: int, pattern, z, v) -> None:
        hs = self.by_layer[layer]
        idx = torch.tensor(hs, device=z.device)
        pattern = pattern[:, idx].float()  # [b, h, T, S]
        z = z[:, :, idx].float()
        v = v[:, :, idx // self.kv_group].float()  # GQA: query head h reads KV head h // g
        act, vnorm = head_writes(pattern, z, v, self.w_o[layer])
        tokens, win_ids, dup, ind = self._batch  # type: ignore[misc]
        self._update_stats(layer, act, pattern, dup, ind)
        self._update_top(layer, act, vnorm, pattern, win_ids)
        self._record_random(layer, hs, act, vnorm, pattern, win_ids)

    def _update_stats(self, layer, act, pattern, dup, ind) -> None:
        b, h, n, _ = pattern.shape
        pos = torch.arange(n, device=act.device)
        a = act[:, :, 1:]  # dest 0 is BOS: it attends only to itself
        p = pattern[:, :, 1:, :]
        dist = (pos[1:, None] - pos[None, :]).clamp(min=0).float()
        dup_has = dup[:, 1:].any(-1)  # [b, T-1]
        ind_has = ind[:, 1:].any(-1)
        dup_score = (p * dup[:, None, 1:].float()).sum(-1)  # [b, h, T-1]
        ind_score = (p * ind[:, None, 1:].float()).sum(-1)
        prev = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)[:, :, 1:]  # t>=2
        new = _HeadStats(
            act_sum=a.sum((0, 2)).double(),
            act_max=a.amax((0, 2)),
            n=torch.full((h,), a.shape[0] * a.shape[2], device=a.device, dtype=torch.float64),
            bos=p[..., 0].sum((0, 2)).double(),
            dist=(p * dist).sum(-1).sum((0, 2)).double(),
            prev=prev.sum((0, 2)).double(),
            dup=(dup_score * dup_has[:, None]).sum((0, 2)).double(),
            dup_n=dup_has.sum().double().expand(h).clone(),
            ind=(ind_score * ind_has[:, None]).sum((0, 2)).double(),
            ind_n=ind_has.sum().double().expand(h).clone(),
        )
        old = self.stats.get(layer)
        if old is None:
            self.stats[layer] = new
            return
        for name in new.__dataclass_fields__:
            a_old, a_new = getattr(old, name), getattr(new, name)
            merged = torch.maximum(a_old, a_new) if name == "act_max" else a_old + a_new
            setattr(old, name, merged)

    def _update_top(self, layer, act, vnorm, pattern, win_ids) -> None:
        s = self.settings
        b, h, n = act.shape
        k = min(s.max_events_per_window, n - 1)
        masked = act.clone()
        masked[:, :, 0] = float("-inf")  # never an event at BOS
        vals, pos = masked.topk(k, dim=-1)  # [b, h, k]
        rows = torch.gather(
            pattern, 2, pos[..., None].expand(b, h, k, pattern.shape[-1])
        )  # [b, h, k, S]
        pair = rows * vnorm[:, :, None, :]
        ks = min(s.top_sources, n)
        src_write, src_pos = pair.topk(ks, dim=-1)
        src_attn = torch.gather(rows, -1, src_pos)

        # candidates [h, b*k]
        def flat(t):
            return t.permute(1, 0, 2, *range(3, t.dim())).reshape(h, b * k, *t.shape[3:])

        win = win_ids[:, None, None].expand(b, h, k)
        acts_rows = act[:, :, None, :].expand(b, h, k, n).to(torch.float16)
        new = _HeadTop(
            vals=flat(vals), win=flat(win), pos=flat(pos), src_pos=flat(src_pos),
            src_attn=flat(src_attn), src_write=flat(src_write), acts=flat(acts_rows),
        )  # fmt: skip
        old = self.top[layer]
        if old is not None:
            new = _HeadTop(
                *(
                    torch.cat([getattr(old, f), getattr(new, f)], 1)
                    for f in _HeadTop.__dataclass_fields__
                )
            )
        if new.vals.shape[1] > s.candidates:
            keep = new.vals.topk(s.candidates, dim=1).indices  # [h, C]

            def pick(t):
                index = keep.view(h, -1, *([1] * (t.dim() - 2))).expand(
                    h, keep.shape[1], *t.shape[2:]
                )
                return torch.gather(t, 1, index)

            new = _HeadTop(*(pick(getattr(new, f)) for f in _HeadTop.__dataclass_fields__))
        self.top[layer] = new

    def _record_random(self, layer, hs, act, vnorm, pattern, win_ids) -> None:
        if not self.settings.random_window_ids:
            return
        ids = win_ids.tolist()
        n = act.shape[-1]
        for bi, wid in enumerate(ids):
            if wid not in self.settings.random_window_ids:
                continue
            acts = act[bi].cpu().numpy()
            self._record_pairs(layer, hs, wid, pattern[bi], vnorm[bi])
            for hi, head in enumerate(hs):
                self.random_rows.append((layer, head, wid, acts[hi].astype(np.float32)))
                # one random (non-BOS) position per head and random window: a random event
                rng = np.random.default_rng([self.settings.seed, wid, layer, head])
                p = int(rng.integers(1, n))
                row = pattern[bi, hi, p]
                pair = row * vnorm[bi, hi]
                ks = min(self.settings.top_sources, n)
                sw, sp = pair.topk(ks)
                self.random_events.append(
                    dict(
                        layer=layer, head=head, window_id=wid, pos=p, act=float(acts[hi, p]),
                        kind="random", src_pos=sp.cpu().numpy().astype(np.int32),
                        src_attn=row[sp].cpu().numpy().astype(np.float32),
                        src_write=sw.cpu().numpy().astype(np.float32),
                    )
                )  # fmt: skip

    def _record_pairs(self, layer, hs, wid, pattern, vnorm) -> None:
        """Pair-scoring candidates of one random window for the heads of a layer."""
        tokens = self._batch[0][list(self._batch[1].tolist()).index(wid)]  # type: ignore[index]
        rng = np.random.default_rng([self.settings.seed, wid, layer, 7])
        for head, cand in zip(hs, candidate_pairs(pattern, vnorm, tokens, rng), strict=True):
            self.random_pairs.append(dict(layer=layer, head=head, window_id=wid, **cand))

    # ---------------------------------------------------------------- driver
    def run(self, tokens: np.ndarray, window_ids: np.ndarray, progress: bool = True) -> CacheResult:
        t0 = time.time()
        self._n_tokens = int(tokens.shape[1])
        bs = self.settings.batch_size
        n_batches = (len(tokens) + bs - 1) // bs
        hooks = self._hooks()
        # No need to run layers after the last analysed one (nor the unembedding).
        last = max(self.by_layer) + 1
        stop = {"stop_at_layer": last} if last < self.bridge.cfg.n_layers else {}
        with torch.inference_mode():
            for i in tqdm(
                range(n_batches), desc="cache: windows", unit="batch", disable=not progress
            ):
                tok = torch.as_tensor(tokens[i * bs : (i + 1) * bs], device=self.device).long()
                wid = torch.as_tensor(window_ids[i * bs : (i + 1) * bs], device=self.device)
                dup, ind = token_masks(tok)
                self._batch = (tok, wid, dup, ind)
                self.bridge.run_with_hooks(tok, fwd_hooks=hooks, return_type=None, **stop)
                if self._tmp:
                    raise RuntimeError(f"hooks left unprocessed tensors: {list(self._tmp)}")
        result = self._collect()
        result.seconds = time.time() - t0
        result.tokens = int(tokens.size)
        log.info(
            "cache: %d windows (%d tokens) through %d heads in %.1fs (%.0f tokens/s)",
            len(tokens), tokens.size, sum(map(len, self.by_layer.values())), result.seconds,
            tokens.size / max(result.seconds, 1e-9),
        )  # fmt: skip
        return result

    def _collect(self) -> CacheResult:
        events, stats_rows, act_rows = [], [], []
        for layer, hs in self.by_layer.items():
            top, st = self.top[layer], self.stats[layer]
            cpu = {f: getattr(top, f).cpu().numpy() for f in _HeadTop.__dataclass_fields__}
            n = st.n.cpu().numpy()
            dup_n = st.dup_n.cpu().numpy()
            ind_n = st.ind_n.cpu().numpy()
            for hi, head in enumerate(hs):
                order = np.argsort(-cpu["vals"][hi], kind="stable")
                seen: set[int] = set()
                for c in order:
                    wid = int(cpu["win"][hi, c])
                    events.append(
                        dict(
                            layer=layer, head=head, window_id=wid, pos=int(cpu["pos"][hi, c]),
                            act=float(cpu["vals"][hi, c]), kind="top",
                            src_pos=cpu["src_pos"][hi, c].astype(np.int32),
                            src_attn=cpu["src_attn"][hi, c].astype(np.float32),
                            src_write=cpu["src_write"][hi, c].astype(np.float32),
                        )
                    )  # fmt: skip
                    if wid not in seen:
                        seen.add(wid)
                        act_rows.append((layer, head, wid, cpu["acts"][hi, c].astype(np.float32)))
                # prev-token counts dest 2.. (dest 1's previous token is BOS): (T-2)/(T-1)
                n_prev = n[hi] * (self._n_tokens - 2) / max(1, self._n_tokens - 1)
                stats_rows.append(
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
        events.extend(self.random_events)
        top_keys = {(r[0], r[1], r[2]) for r in act_rows}
        act_rows.extend(r for r in self.random_rows if (r[0], r[1], r[2]) not in top_keys)
        raw = pd.DataFrame(events)
        raw["kind"] = raw["kind"].astype(str)
        acts = pd.DataFrame(act_rows, columns=["layer", "head", "window_id", "acts"])
        acts["is_random"] = [(wid in self.settings.random_window_ids) for wid in acts["window_id"]]
        return CacheResult(
            raw_events=raw.sort_values(["layer", "head", "kind", "act"], ascending=[True, True, False, False]).reset_index(drop=True),
            head_stats=pd.DataFrame(stats_rows).sort_values(["layer", "head"]).reset_index(drop=True),
            activations=acts.sort_values(["layer", "head", "window_id"]).reset_index(drop=True),
            pairs=pd.DataFrame(self.random_pairs, columns=PAIRS_COLUMNS),
        )  # fmt: skip


def choose_random_windows(n_windows: int, count: int, seed: int) -> frozenset[int]:
    """A seeded set of window ids whose every token is recorded for every head."""
    count = min(count, n_windows)
    rng = np.random.default_rng([seed, 17])
    return frozenset(int(i) for i in rng.choice(n_windows, size=count, replace=False))
