"""Stage 'head_types': windows.parquet -> head_types.parquet (every head of the model).

Runs whatever `max_heads` is; the class thresholds are params, the measurement is in
head_explain.head_types.
"""

from __future__ import annotations

from typing import Any

from head_explain import artifacts as art
from head_explain import models
from head_explain.config import Config
from head_explain.runners.common import expected_meta, out, stage_meta

STAGE = "head_types"


def preflight(cfg: Config) -> None:
    models.check_settings(cfg.model, cfg.device, cfg.dtype, cfg.window_len)


def check_reusable(cfg: Config) -> None:
    """Skipped with the cache stage (--skip-cache), whose check covers head_types.parquet."""


def run(cfg: Config) -> dict[str, Any]:
    import numpy as np

    from head_explain.head_types import Thresholds, head_types

    windows, _ = art.read_parquet(out(cfg, "windows.parquet"), expected_meta(cfg, "sample"))
    bridge, tok = models.load_bridge(cfg.model, cfg.device, cfg.dtype)
    tokens = np.stack(windows["tokens"].to_numpy()[: cfg.type_windows])
    th = Thresholds(
        previous_token=cfg.class_previous_token, induction=cfg.class_induction,
        duplicate_token=cfg.class_duplicate_token, self=cfg.class_self,
        fixed_offset=cfg.class_fixed_offset, bos_sink=cfg.class_bos_sink,
    )  # fmt: skip
    df = head_types(bridge, tokens, models.bos_id(tok), th, cfg.batch_size, cfg.seed)
    art.write_parquet(out(cfg, "head_types.parquet"), df, stage_meta(cfg, STAGE))
    return {
        "heads": len(df),
        "type_windows": len(tokens),
        "class_counts": df["head_class"].value_counts().to_dict(),
    }
