"""What every stage runner shares: artifact paths, provenance metadata, stage metrics,
the failure threshold, and the timed run of one stage."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from head_explain import artifacts as art
from head_explain.config import Config, config_hash
from head_explain.errors import ConfigError, StageFailed
from head_explain.graph import STAGE_PARAMS

log = logging.getLogger(__name__)


def out(cfg: Config, name: str) -> Path:
    return Path(cfg.outdir) / name


def stage_meta(cfg: Config, stage: str) -> dict[str, str]:
    """Provenance stamped into a stage's parquet outputs."""
    return {"stage": stage, **expected_meta(cfg, stage)}


def expected_meta(cfg: Config, stage: str) -> dict[str, str]:
    """What a reader requires of an artifact written by `stage` under this config."""
    return {"model": cfg.model, "config_hash": config_hash(cfg, STAGE_PARAMS[stage])}


def write_stage_metrics(cfg: Config, stage: str, metrics: dict[str, Any]) -> None:
    art.write_json(out(cfg, f"metrics/{stage}.json"), {"stage": stage, **metrics})


def progress_enabled() -> bool:
    return os.environ.get("HEAD_EXPLAIN_PROGRESS", "1") != "0"


def check_writable(outdir: str) -> None:
    path = Path(outdir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"key 'outdir': '{outdir}' cannot be a folder: {probe} is a file; give a folder path"
        )
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"key 'outdir': '{outdir}' is not writable (checked {probe})")


def fail_check(cfg: Config, stage: str, n_failed: int, n_total: int, first: str | None) -> None:
    """StageFailed (exit 1, artifacts kept) when too many heads failed."""
    if n_total and n_failed / n_total > cfg.max_failed_fraction:
        raise StageFailed(
            f"{stage}: {n_failed}/{n_total} heads failed (max_failed_fraction="
            f"{cfg.max_failed_fraction}); first error: {first}. Finished heads are kept; "
            "rerun to retry transient failures (answers already received, unusable ones included, "
            "come from the cache)"
        )


def llm_metrics(backend) -> dict[str, Any]:
    return {"model": backend.model, "backend": backend.kind, "llm": backend.stats.as_dict()}


async def with_close(backend, coro):
    try:
        return await coro
    finally:
        await backend.aclose()


def run_stage(runner: ModuleType, cfg: Config) -> dict[str, Any]:
    """Run one stage's runner, time it, and write its metrics JSON."""
    stage = runner.STAGE
    log.info("stage %s: starting", stage)
    t0 = time.time()
    metrics = runner.run(cfg)
    seconds = round(time.time() - t0, 2)
    # explain/simulate also wrote their metrics themselves (so a StageFailed run keeps
    # them); they return that same dict, so adding the time here is all that is left.
    metrics = {**metrics, "seconds": seconds}
    write_stage_metrics(cfg, stage, {k: v for k, v in metrics.items() if k != "stage"})
    log.info("stage %s: done in %.1fs", stage, seconds)
    return metrics
