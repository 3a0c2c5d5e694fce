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

from head_explain.attention_math import head_writes, token_masks, write_norm_factor
from head_explain.head_buffers import (
    HeadStats,
    HeadTop,
    new_top,
    update_stats,
    update_top,
)
from head_explain.head_buffers import (
    stats_rows as stats_rows_of,
)
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
    min_event_pos: int = 2  # earliest event destination (config.min_event_pos)


@dataclass
class CacheResult:
    raw_events: pd.DataFrame
    head_stats: pd.DataFrame
    activations: pd.DataFrame
    seconds: float = 0.0
    tokens: int = 0
    pairs: pd.DataFrame | None = None  # pair-scoring candidates of the random windows


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
        self.top: dict[int, HeadTop] = {}
        self.stats: dict[int, HeadStats] = {}
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
        update_stats(self.stats, layer, act, pattern, dup, ind)
        top = self.top.get(layer)
        if top is None:
            b, h, n = act.shape
            ks = min(self.settings.top_sources, n)
            top = self.top[layer] = new_top(self.settings, h, n, ks, self.device)
        update_top(top, self.settings, act, vnorm, pattern, win_ids)
        self._record_random(layer, hs, act, vnorm, pattern, win_ids)

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
                # one random position per head and random window (from min_event_pos,
                # as top events): a random event
                rng = np.random.default_rng([self.settings.seed, wid, layer, head])
                p = int(rng.integers(min(self.settings.min_event_pos, n - 1), n))
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
            cpu = {f.name: getattr(top, f.name)[:, :c].cpu().numpy() for f in fields(HeadTop)}
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
            stats_rows += stats_rows_of(layer, hs, st, self._n_tokens)
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


def choose_random_windows(n_windows: int, count: int, seed: int) -> frozenset[int]:
    """A seeded set of window ids whose every token is recorded for every head."""
    count = min(count, n_windows)
    rng = np.random.default_rng([seed, 17])
    return frozenset(int(i) for i in rng.choice(n_windows, size=count, replace=False))
