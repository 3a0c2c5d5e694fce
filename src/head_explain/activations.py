"""Streaming head activations: hooks → per-head write norms, top events, statistics.

Activation of head h at destination token t is the norm of what the head writes into
the residual stream there, ‖z[t,h] · W_O[h]‖. For each kept event we also record the
top source positions s by their share of that write, attention[t,s] · ‖v[s] · W_O[h]‖
(OpenAI transformer-debugger's "attention write"), so an explainer can say
"attends from X to Y".

Hooks may fire in any order (bridges of other architectures fire hook_pattern after
hook_z): each layer's pattern, v and z are collected under (layer, role) and the layer
is processed once all three have arrived. Once every analysed layer is done the forward
stops (no later layers, no logits).

Memory is bounded by construction, independently of the number of windows: at most one
layer's hook tensors are alive at a time; each layer keeps fixed-size candidate buffers
of `candidates + batch_size·max_events_per_window` slots per head, allocated once and
merged in place (about heads × slots × (window_len·2 + 40) bytes; the window's
activations are float16); random windows add heads × random_windows × window_len × 4
bytes. The end-of-stage collection is columnar (numpy arrays, no per-event objects).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from head_explain.pair_candidates import PAIRS_COLUMNS, candidate_pairs

log = logging.getLogger(__name__)

ROLES = ("pattern", "v", "z")
TRIM_EVERY = 32  # batches between returns of freed heap memory to the OS


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
    expanded from KV heads), w_o [h, d_head, m]: W_O itself or its norm factor (same
    norms, see `write_norm_factor`). Returns act [b, h, dest] = ‖z·W_O‖ and
    vnorm [b, h, src] = ‖v·W_O‖.
    """
    act = torch.linalg.vector_norm(torch.einsum("bphd,hdm->bhpm", z, w_o), dim=-1)
    vnorm = torch.linalg.vector_norm(torch.einsum("bphd,hdm->bhpm", v, w_o), dim=-1)
    return act, vnorm


def write_norm_factor(w_o: torch.Tensor) -> torch.Tensor:
    """F [h, d_head, r] with ‖x·F‖ = ‖x·W_O‖ for every x, r = min(d_head, d_model).

    W_Oᵀ = Q·R (reduced QR, Q orthonormal columns) gives x·W_O = x·Rᵀ·Qᵀ and
    ‖x·Rᵀ·Qᵀ‖ = ‖x·Rᵀ‖: the norm costs d_head² instead of d_head·d_model per token
    (9× less on SmolLM2, 12× on GPT-2) and stays an exact norm (no cancellation, unlike
    the quadratic form xᵀ·W_O·W_Oᵀ·x). Computed in float64.
    """
    w = w_o.double()
    if w.shape[1] >= w.shape[2]:
        return w_o.float()
    _, r = torch.linalg.qr(w.transpose(1, 2))  # [h, d_model, d_head] -> R [h, d_head, d_head]
    return r.transpose(1, 2).float()


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


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings include it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim).

    Freed tensors between 128 kB and 32 MB land in glibc's heap arenas, not mmap, and
    stay resident; trimming keeps RSS at what is live.
    """
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and "libc" in libc:
        with contextlib.suppress(OSError, AttributeError):  # musl has no malloc_trim
            ctypes.CDLL(libc).malloc_trim(0)


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
        self.n_heads = bridge.cfg.n_heads
        self.device = next(bridge.parameters()).device
        self.head_idx = {
            layer: torch.tensor(hs, device=self.device) for layer, hs in self.by_layer.items()
        }
        self.w_o = {
            layer: write_norm_factor(bridge.W_O[layer, hs].detach()).to(self.device)
            for layer, hs in self.by_layer.items()
        }
        self.top: dict[int, _HeadTop] = {}
        self.stats: dict[int, _HeadStats] = {}
        self.random_rows: list[tuple[int, int, int, np.ndarray]] = []
        self.random_events: list[dict] = []
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._done: set[int] = set()
        self.random_pairs: list[dict] = []
        self._batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.rng = np.random.default_rng(settings.seed)

    # ---------------------------------------------------------------- hooks
    def _hooks(self):
        # Keyed by (layer, role) from the hook we registered, never by the name the
        # bridge reports (aliases resolve: hook_v -> v.hook_out, hook_z -> o.hook_in).
        return [
            (f"blocks.{layer}.attn.hook_{role}", partial(self._arrive, layer, role))
            for layer in self.by_layer
            for role in ROLES
        ]

    def _arrive(self, layer: int, role: str, tensor, hook):
        got = self._pending.setdefault(layer, {})
        got[role] = tensor.detach()
        if len(got) == len(ROLES):
            del self._pending[layer]
            self._process_layer(layer, got["pattern"], got["z"], got["v"])
            self._done.add(layer)
            if len(self._done) == len(self.by_layer):
                # Every analysed layer is done: skip the rest of the model and the logits.
                raise StopAtLayerException(None)
        return tensor

    # ---------------------------------------------------------------- maths
    def _process_layer(self, layer: int, pattern, z, v) -> None:
        hs = self.by_layer[layer]
        if len(hs) < self.n_heads:
            idx = self.head_idx[layer]
            pattern, z = pattern[:, idx], z[:, :, idx]
        else:
            idx = None
        pattern, z = pattern.float(), z.float()  # [b, h, T, S], [b, T, h, d]
        group = self.n_heads // v.shape[2]  # GQA: query head h reads KV head h // group
        if group > 1 or idx is not None:
            full = torch.arange(self.n_heads, device=v.device) if idx is None else idx
            v = v[:, :, full // group]
        act, vnorm = head_writes(pattern, z, v.float(), self.w_o[layer])
        tokens, win_ids, dup, ind = self._batch  # type: ignore[misc]
        self._update_stats(layer, act, pattern, dup, ind)
        self._update_top(layer, act, vnorm, pattern, win_ids)
        self._record_random(layer, hs, act, vnorm, pattern, win_ids)

    def _update_stats(self, layer, act, pattern, dup, ind) -> None:
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
        new = _HeadStats(
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
        old = self.stats.get(layer)
        if old is None:
            self.stats[layer] = new
            return
        for f in fields(_HeadStats):
            a_old, a_new = getattr(old, f.name), getattr(new, f.name)
            merged = torch.maximum(a_old, a_new) if f.name == "act_max" else a_old + a_new
            setattr(old, f.name, merged)

    def _new_top(self, h: int, n: int, ks: int) -> _HeadTop:
        s = self.settings
        slots = s.candidates + s.batch_size * min(s.max_events_per_window, n - 1)
        dev = self.device

        def empty(*shape, dtype=torch.float32):
            return torch.zeros((h, slots, *shape), device=dev, dtype=dtype)

        top = _HeadTop(
            vals=torch.full((h, slots), float("-inf"), device=dev),
            win=empty(dtype=torch.long), pos=empty(dtype=torch.long),
            src_pos=empty(ks, dtype=torch.long), src_attn=empty(ks), src_write=empty(ks),
            acts=empty(n, dtype=torch.float16),
        )  # fmt: skip
        return top

    def _update_top(self, layer, act, vnorm, pattern, win_ids) -> None:
        s = self.settings
        b, h, n = act.shape
        k = min(s.max_events_per_window, n - 1)
        ks = min(s.top_sources, n)
        masked = act.clone()
        masked[:, :, 0] = float("-inf")  # never an event at BOS
        vals, pos = masked.topk(k, dim=-1)  # [b, h, k]
        rows = torch.gather(
            pattern, 2, pos[..., None].expand(b, h, k, pattern.shape[-1])
        )  # [b, h, k, S]
        src_write, src_pos = (rows * vnorm[:, :, None, :]).topk(ks, dim=-1)
        src_attn = torch.gather(rows, -1, src_pos)

        # candidates [h, b*k, ...]
        def flat(t):
            return t.permute(1, 0, 2, *range(3, t.dim())).reshape(h, b * k, *t.shape[3:])

        top = self.top.get(layer)
        if top is None:
            top = self.top[layer] = self._new_top(h, n, ks)
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
        for f in fields(_HeadTop):
            buf = getattr(top, f.name)
            index = keep.view(h, c, *([1] * (buf.dim() - 2))).expand(h, c, *buf.shape[2:])
            buf[:, :c] = torch.gather(buf, 1, index)

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
        sync(self.device)
        t0 = time.time()
        self._n_tokens = int(tokens.shape[1])
        bs = self.settings.batch_size
        n_batches = (len(tokens) + bs - 1) // bs
        hooks = self._hooks()
        with torch.inference_mode():
            for i in tqdm(
                range(n_batches), desc="cache: windows", unit="batch", disable=not progress
            ):
                # copies (artifact arrays may be read-only), then one move to the device
                tok = torch.tensor(tokens[i * bs : (i + 1) * bs], dtype=torch.long).to(self.device)
                wid = torch.tensor(window_ids[i * bs : (i + 1) * bs], dtype=torch.long)
                wid = wid.to(self.device)
                dup, ind = token_masks(tok)
                self._batch = (tok, wid, dup, ind)
                self._done.clear()
                self.bridge.run_with_hooks(tok, fwd_hooks=hooks, return_type=None)
                if self._pending or len(self._done) != len(self.by_layer):
                    missing = sorted(set(self.by_layer) - self._done)
                    raise RuntimeError(
                        f"hooks of layers {missing} did not all fire "
                        f"(partial: { {k: list(v) for k, v in self._pending.items()} })"
                    )
                self._batch = None
                if (i + 1) % TRIM_EVERY == 0:
                    release_memory()
        sync(self.device)
        result = self._collect()
        release_memory()
        result.seconds = time.time() - t0
        result.tokens = int(tokens.size)
        log.info(
            "cache: %d windows (%d tokens) through %d heads in %.1fs (%.0f tokens/s)",
            len(tokens), tokens.size, sum(map(len, self.by_layer.values())), result.seconds,
            tokens.size / max(result.seconds, 1e-9),
        )  # fmt: skip
        return result

    def _collect(self) -> CacheResult:
        """Columnar: one numpy array per field and layer; rows are views, not objects."""
        c = self.settings.candidates
        cols: dict[str, list[np.ndarray]] = {}
        act_cols: dict[str, list] = {"layer": [], "head": [], "window_id": [], "acts": []}
        stats_rows = []
        for layer, hs in self.by_layer.items():
            top, st = self.top[layer], self.stats[layer]
            h = len(hs)
            cpu = {f.name: getattr(top, f.name)[:, :c].cpu().numpy() for f in fields(_HeadTop)}
            valid = np.isfinite(cpu["vals"])  # fewer candidates than slots: -inf stays out
            order = np.argsort(-cpu["vals"], axis=1, kind="stable")
            for name in cpu:
                cpu[name] = np.take_along_axis(
                    cpu[name], order.reshape(h, c, *([1] * (cpu[name].ndim - 2))), axis=1
                )
            valid = np.take_along_axis(valid, order, axis=1)
            heads = np.broadcast_to(np.asarray(hs)[:, None], (h, c))[valid]
            for name, value in (
                ("layer", np.full(len(heads), layer)), ("head", heads),
                ("window_id", cpu["win"][valid]), ("pos", cpu["pos"][valid]),
                ("act", cpu["vals"][valid].astype(np.float32)),
                ("src_pos", cpu["src_pos"][valid].astype(np.int32)),
                ("src_attn", cpu["src_attn"][valid].astype(np.float32)),
                ("src_write", cpu["src_write"][valid].astype(np.float32)),
            ):  # fmt: skip
                cols.setdefault(name, []).append(value)
            for hi, head in enumerate(hs):  # one activation row per (head, window)
                wins = cpu["win"][hi][valid[hi]]
                _, first = np.unique(wins, return_index=True)
                act_cols["layer"] += [layer] * len(first)
                act_cols["head"] += [head] * len(first)
                act_cols["window_id"] += wins[first].tolist()
                act_cols["acts"] += list(cpu["acts"][hi][valid[hi]][first].astype(np.float32))
            stats_rows += self._stats_rows(layer, hs, st)
        raw = pd.DataFrame(
            {
                name: (list(np.concatenate(v)) if name.startswith("src_") else np.concatenate(v))
                for name, v in cols.items()
            }
        )
        raw.insert(5, "kind", "top")  # the column order of the artifact contract
        if self.random_events:
            raw = pd.concat([raw, pd.DataFrame(self.random_events, columns=raw.columns)])
        raw["kind"] = raw["kind"].astype(str)
        acts = pd.DataFrame(act_cols)
        top_keys = set(zip(acts["layer"], acts["head"], acts["window_id"], strict=True))
        extra = [r for r in self.random_rows if (r[0], r[1], r[2]) not in top_keys]
        if extra:
            acts = pd.concat([acts, pd.DataFrame(extra, columns=list(act_cols))], ignore_index=True)
        acts["is_random"] = acts["window_id"].isin(self.settings.random_window_ids)
        return CacheResult(
            raw_events=raw.sort_values(["layer", "head", "kind", "act"], ascending=[True, True, False, False]).reset_index(drop=True),
            head_stats=pd.DataFrame(stats_rows).sort_values(["layer", "head"]).reset_index(drop=True),
            activations=acts.sort_values(["layer", "head", "window_id"]).reset_index(drop=True),
            pairs=pd.DataFrame(self.random_pairs, columns=PAIRS_COLUMNS),
        )  # fmt: skip

    def _stats_rows(self, layer: int, hs: list[int], st: _HeadStats) -> list[dict]:
        n, dup_n, ind_n = (t.cpu().numpy() for t in (st.n, st.dup_n, st.ind_n))
        rows = []
        for hi, head in enumerate(hs):
            # prev-token counts dest 2.. (dest 1's previous token is BOS): (T-2)/(T-1)
            n_prev = n[hi] * (self._n_tokens - 2) / max(1, self._n_tokens - 1)
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


def choose_random_windows(n_windows: int, count: int, seed: int) -> frozenset[int]:
    """A seeded set of window ids whose every token is recorded for every head."""
    count = min(count, n_windows)
    rng = np.random.default_rng([seed, 17])
    return frozenset(int(i) for i in rng.choice(n_windows, size=count, replace=False))
