"""Attention patterns for the excerpts the browser draws as a destination x source map.

The cache stage keeps only each event's few strongest sources, so the full rows of an
excerpt's pattern are recomputed here: the windows holding each head's first explain
excerpt go through the model in batches, cut after the excerpt and stopped after the
last layer needed. Tiny next to the cache
stage (one window per head) and deterministic, so any stage holding a bridge, windows
and events can call it; its result has the columns of `attention_patterns.parquet`.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def pattern_events(events: pd.DataFrame) -> pd.DataFrame:
    """Per head, the event whose excerpt the head page shows first (explain, rank 0)."""
    ex = events[events["split"] == "explain"]
    if not len(ex):
        ex = events
    return ex.sort_values(["layer", "head", "rank"]).drop_duplicates(["layer", "head"])


def excerpt_patterns(
    bridge, windows: pd.DataFrame, events: pd.DataFrame, batch_size: int = 8
) -> pd.DataFrame:
    """layer, head, window_id, split, rank, excerpt_start, rows (dest x src over the excerpt).

    rows[i][j] is the attention of excerpt token i to excerpt token j (the causal upper
    triangle is zero); weight on tokens before the excerpt (BOS included) is left out,
    so a row sums to at most 1.
    """
    import torch

    chosen = pattern_events(events)
    tokens_of = dict(zip(windows["window_id"], windows["tokens"], strict=True))
    device = next(bridge.parameters()).device
    # Causal attention: rows up to an excerpt's end need no later token, so each window
    # is cut after its last excerpt, and windows of similar length are batched together.
    need = chosen.groupby("window_id")["excerpt_end"].max().astype(int).to_dict()
    wids = sorted(need, key=lambda w: (need[w], w))
    layers = sorted({int(x) for x in chosen["layer"]})
    stop = max(layers) + 1 if layers else 0
    kwargs = {"stop_at_layer": stop} if stop < bridge.cfg.n_layers else {}
    out = []
    t0 = time.time()
    with torch.inference_mode():
        for b in range(0, len(wids), batch_size):
            batch = wids[b : b + batch_size]
            row_of = {w: i for i, w in enumerate(batch)}
            grabbed: dict[int, torch.Tensor] = {}

            def keep(tensor, hook, grabbed=grabbed):
                grabbed[int(hook.name.split(".")[1])] = tensor.detach().float().cpu()

            hooks = [(f"blocks.{layer}.attn.hook_pattern", keep) for layer in layers]
            cut = max(need[w] for w in batch)
            rows = np.stack([np.asarray(tokens_of[w])[:cut] for w in batch])
            tok = torch.as_tensor(rows, device=device)
            bridge.run_with_hooks(tok.long(), fwd_hooks=hooks, return_type=None, **kwargs)
            for r in chosen[chosen["window_id"].isin(batch)].itertuples(index=False):
                s, e = int(r.excerpt_start), int(r.excerpt_end)
                pat = grabbed[int(r.layer)][row_of[int(r.window_id)], int(r.head), s:e, s:e]
                out.append(
                    dict(
                        layer=int(r.layer), head=int(r.head), window_id=int(r.window_id),
                        split=str(r.split), rank=int(r.rank), excerpt_start=s,
                        rows=list(pat.numpy().astype(np.float32)),
                    )
                )  # fmt: skip
    log.info("browser: attention patterns for %d heads in %.1fs", len(out), time.time() - t0)
    return pd.DataFrame(out)
