"""Stage 'sample': corpus -> windows.parquet (token windows with provenance)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from head_explain import artifacts as art
from head_explain import models
from head_explain.config import Config, source_list
from head_explain.errors import ConfigError
from head_explain.runners.common import out, stage_meta

STAGE = "sample"


def preflight(cfg: Config) -> None:
    # Cheapest first: the corpus paths need no torch import, the model checks do.
    for src in source_list(cfg):
        if src == "stackexchange" and not Path(cfg.stackexchange_dir).is_dir():
            raise ConfigError(
                f"key 'stackexchange_dir': '{cfg.stackexchange_dir}' is not a folder; "
                "give the `out` folder of EleutherAI/stackexchange-dataset"
            )
        if src == "stackexchange":  # an empty folder fails here, not mid-stage
            from head_explain.data.stackexchange import find_files

            find_files(Path(cfg.stackexchange_dir))
        if src == "files":  # extensions and existence, before any model load
            from head_explain.data.files import file_list

            file_list(cfg)
        if src == "wikitext" and cfg.wikitext_dir and not Path(cfg.wikitext_dir).is_dir():
            raise ConfigError(f"key 'wikitext_dir': '{cfg.wikitext_dir}' is not a folder")
    models.check_settings(cfg.model, cfg.device, cfg.dtype, cfg.window_len)


def run(cfg: Config) -> dict[str, Any]:
    from head_explain.data.windows import sample_windows

    tok = models.load_tokenizer(cfg.model)
    df = sample_windows(cfg, tok, models.bos_id(tok))
    art.ensure_outdir(cfg.outdir)
    art.write_parquet(out(cfg, "windows.parquet"), df, stage_meta(cfg, STAGE))
    return {"windows": len(df), "tokens": int(len(df) * cfg.window_len),
            "by_source": df["source"].value_counts().to_dict()}  # fmt: skip
