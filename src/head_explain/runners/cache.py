"""Stage 'cache': windows.parquet (+ head_types.parquet) -> raw_events, head_stats,
activations, pairs (.parquet).

Streams the windows through the subject model and keeps bounded per-head summaries
(see head_explain.activations). With head_choice=classes the heads are the strongest of
each class (head_types.parquet) first, then a spread.
"""

from __future__ import annotations

from typing import Any

from head_explain import artifacts as art
from head_explain import models
from head_explain.config import Config, config_hash
from head_explain.errors import ArtifactError
from head_explain.graph import OUTPUTS, STAGE_PARAMS
from head_explain.heads import choose_heads, head_name
from head_explain.runners.common import expected_meta, out, progress_enabled, stage_meta

STAGE = "cache"


def preflight(cfg: Config) -> None:
    models.check_settings(cfg.model, cfg.device, cfg.dtype, cfg.window_len)
    if cfg.heads:  # a head the model lacks: refuse before sampling
        shape = models.head_shape(cfg.model)
        if shape:
            choose_heads(*shape, cfg.max_heads, cfg.heads)


def run(cfg: Config) -> dict[str, Any]:
    import numpy as np  # heavy imports stay out of the CLI's start-up (bad input exits fast)

    from head_explain.activations import (
        CacheSettings,
        HeadActivationCache,
        choose_random_windows,
    )

    windows, _ = art.read_parquet(out(cfg, "windows.parquet"), expected_meta(cfg, "sample"))
    bridge, _ = models.load_bridge(cfg.model, cfg.device, cfg.dtype)
    heads = choose_heads(bridge.cfg.n_layers, bridge.cfg.n_heads, cfg.max_heads, cfg.heads)
    classes: dict[str, str] = {}
    if cfg.head_choice == "classes" and not cfg.heads:
        from head_explain.head_types import choose_heads_by_class

        types, _ = art.read_parquet(out(cfg, "head_types.parquet"), {"model": cfg.model})
        if len(heads) < len(types):
            heads = choose_heads_by_class(types, heads, cfg.max_heads)
        classes = dict(zip(types["head_name"], types["head_class"], strict=True))
    settings = CacheSettings(
        candidates=cfg.candidates, max_events_per_window=cfg.max_events_per_window,
        top_sources=cfg.top_sources, batch_size=cfg.batch_size, seed=cfg.seed,
        min_event_pos=cfg.min_event_pos,
        random_window_ids=choose_random_windows(len(windows), cfg.random_windows, cfg.seed),
    )  # fmt: skip
    tokens = np.stack(windows["tokens"].to_numpy())
    result = HeadActivationCache(bridge, heads, settings).run(
        tokens, windows["window_id"].to_numpy(), progress=progress_enabled()
    )
    meta = stage_meta(cfg, STAGE) | {"sample_hash": config_hash(cfg, STAGE_PARAMS["sample"])}
    # All four or none: a full disk on the last must not leave the first two swapped in.
    art.write_parquet_set(
        {
            out(cfg, "raw_events.parquet"): result.raw_events,
            out(cfg, "head_stats.parquet"): result.head_stats,
            out(cfg, "activations.parquet"): result.activations,
            out(cfg, "pairs.parquet"): result.pairs,
        },
        meta,
    )
    return {
        "heads": [head_name(layer, head) for layer, head in heads],
        "n_heads": len(heads),
        "head_classes": {head_name(*h): classes[head_name(*h)] for h in heads if classes},
        "model_shape": {"layers": bridge.cfg.n_layers, "heads": bridge.cfg.n_heads},
        "events": len(result.raw_events),
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
    }


def check_reusable(cfg: Config) -> None:
    """For --skip-cache: the sample/cache artifacts exist and match model and params."""
    sample_hash = config_hash(cfg, STAGE_PARAMS["sample"])
    wants: dict[str, tuple[str, dict[str, str]]] = {
        "windows.parquet": ("sample", {"model": cfg.model, "config_hash": sample_hash})
    }
    for name in OUTPUTS[STAGE]:
        wants[name] = (STAGE, expected_meta(cfg, STAGE) | {"sample_hash": sample_hash})
    wants["head_types.parquet"] = ("head_types", expected_meta(cfg, "head_types"))
    for name, (stage, want) in wants.items():
        path = out(cfg, name)
        if not path.exists():
            raise ArtifactError(f"--skip-cache: {path} is missing; run without --skip-cache")
        try:
            meta = art.read_meta(path)
        except Exception as exc:  # corrupt or not parquet
            why = " ".join(str(exc).split())[:120]
            raise ArtifactError(
                f"--skip-cache: {path} is not a readable parquet file ({why}); "
                "run without --skip-cache"
            ) from None
        for key, value in want.items():
            if meta.get(key) == value:
                continue
            if key == "model":
                what = f"model {meta.get('model')!r}, not {cfg.model!r}"
            else:
                which = "sample" if key == "sample_hash" else stage
                what = f"other {which} params (one of {', '.join(STAGE_PARAMS[which])} differs)"
            raise ArtifactError(
                f"--skip-cache: {path} was made with {what}; run without --skip-cache"
            )
    # Columns, types and every page; the three cache outputs from one run.
    try:
        for name in wants:
            art.check_parquet(out(cfg, name), full=True)
        art.check_same_run([out(cfg, name) for name in OUTPUTS[STAGE]])
    except ArtifactError as exc:
        raise ArtifactError(f"--skip-cache: {exc}; or run without --skip-cache") from None
