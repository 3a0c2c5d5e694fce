"""Checks of a whole Config that need no model or data (`config.build` runs them).

Model-dependent checks live beside the model (models.py); a check that fails raises a
ConfigError naming the key, the bad value and what would be valid.
"""

from __future__ import annotations

import math

from head_explain.config import CLASS_THRESHOLDS, FIELDS, SOURCES, Config, doc, source_list
from head_explain.errors import ConfigError


def validate(cfg: Config) -> None:
    """Checks that need no model or data. Model-dependent checks live beside the model."""
    for name, fld in FIELDS.items():
        choices = fld.metadata.get("choices")
        value = getattr(cfg, name)
        if choices and value not in choices:
            raise ConfigError(f"key '{name}': {value!r} is not one of {', '.join(choices)}")
    positive = [
        "explain_max_tokens",
        "windows",
        "window_len",
        "batch_size",
        "max_heads",
        "candidates",
        "max_events_per_window",
        "min_event_pos",
        "top_sources",
        "topk",
        "explain_examples",
        "excerpt_len",
        "llm_concurrency",
        "excerpts_per_request",
        "min_cluster_size",
    ]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"key '{name}': {getattr(cfg, name)} must be a positive integer")
    for name in ("random_windows", "score_top_examples", "score_random_examples"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"key '{name}': {getattr(cfg, name)} must be >= 0")
    if not (math.isfinite(cfg.llm_timeout_s) and cfg.llm_timeout_s > 0):
        raise ConfigError(
            f"key 'llm_timeout_s': {cfg.llm_timeout_s} must be a finite number of seconds > 0"
        )
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"key 'seed': {cfg.seed} must be an integer from 0 to 2**63-1")
    if cfg.llm_max_retries < 0:
        raise ConfigError(f"key 'llm_max_retries': {cfg.llm_max_retries} must be >= 0")
    for name in ("model", "outdir", "mlflow_experiment", "embedding_model", "openai_model"):
        if not str(getattr(cfg, name)).strip():
            raise ConfigError(f"key '{name}': empty; {doc(name)}")
    if not cfg.max_cost_usd >= 0 or cfg.max_cost_usd == float("inf"):  # NaN fails too
        raise ConfigError(
            f"key 'max_cost_usd': {cfg.max_cost_usd} must be a number >= 0 (0: no limit)"
        )
    if not 0 <= cfg.max_failed_fraction <= 1:
        raise ConfigError(
            f"key 'max_failed_fraction': {cfg.max_failed_fraction} must be between 0 and 1"
        )
    for name in CLASS_THRESHOLDS:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(
                f"key '{name}': {getattr(cfg, name)} is not a fraction; give a value in [0, 1]"
            )
    if cfg.type_windows <= 0:
        raise ConfigError(f"key 'type_windows': {cfg.type_windows} must be a positive integer")
    if cfg.window_len < 8:
        raise ConfigError(f"key 'window_len': {cfg.window_len} must be at least 8 tokens")
    if cfg.min_event_pos >= cfg.window_len:
        raise ConfigError(
            f"key 'min_event_pos': {cfg.min_event_pos} leaves no event position in windows "
            f"of window_len={cfg.window_len}; give 1 to {cfg.window_len - 1}"
        )
    if cfg.topk > cfg.candidates:
        raise ConfigError(
            f"key 'topk': {cfg.topk} exceeds candidates={cfg.candidates} kept by the cache "
            "stage; raise 'candidates' (reruns cache) or lower 'topk'"
        )
    sources = source_list(cfg)
    if not sources:
        raise ConfigError(f"key 'sources': empty; valid: {', '.join(SOURCES)}")
    for s in sources:
        if s not in SOURCES:
            raise ConfigError(f"key 'sources': unknown source '{s}'; valid: {', '.join(SOURCES)}")
    if "stackexchange" in sources and not cfg.stackexchange_dir:
        raise ConfigError(
            "key 'stackexchange_dir': empty, but sources include stackexchange; give the "
            "`out` folder of EleutherAI/stackexchange-dataset"
        )
    if "files" in sources and not cfg.data_files:
        raise ConfigError("key 'data_files': empty, but sources include files")
    from head_explain.heads import parse_heads  # local: heads imports nothing from here

    parse_heads(cfg.heads)
