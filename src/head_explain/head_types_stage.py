"""Runner of the `head_types` stage: windows.parquet -> head_types.parquet (every head).

Moves to runners/head_types.py once that layout lands.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.head_types import Thresholds, head_types


def thresholds(cfg: Config) -> Thresholds:
    return Thresholds(
        previous_token=cfg.class_previous_token, induction=cfg.class_induction,
        duplicate_token=cfg.class_duplicate_token, self=cfg.class_self,
        fixed_offset=cfg.class_fixed_offset, bos_sink=cfg.class_bos_sink,
    )  # fmt: skip


def run_head_types(cfg: Config) -> dict[str, Any]:
    from head_explain.models import bos_id, load_bridge
    from head_explain.pipeline import _expect, _meta, out

    windows, _ = art.read_parquet(out(cfg, "windows.parquet"), _expect(cfg, "sample"))
    bridge, tok = load_bridge(cfg.model, cfg.device, cfg.dtype)
    tokens = np.stack(windows["tokens"].to_numpy()[: cfg.type_windows])
    df = head_types(bridge, tokens, bos_id(tok), thresholds(cfg), cfg.batch_size, cfg.seed)
    art.write_parquet(out(cfg, "head_types.parquet"), df, _meta(cfg, "head_types"))
    return {
        "heads": len(df),
        "type_windows": len(tokens),
        "class_counts": df["head_class"].value_counts().to_dict(),
    }
