"""Stage order and skips: the CLI runs the same stage runners DVC runs, in order.

Each runner (head_explain.runners.<stage>) reads only earlier artifacts and its own
params, writes its outputs atomically, and leaves `metrics/<stage>.json`.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

from head_explain.config import Config
from head_explain.errors import ArtifactError
from head_explain.graph import OUTPUTS, STAGE_PARAMS, STAGES
from head_explain.locks import outdir_lock
from head_explain.runners import (
    browser,
    cache,
    cluster,
    explain,
    head_types,
    report,
    sample,
    select,
    simulate,
)
from head_explain.runners.common import check_writable, out, run_stage

log = logging.getLogger(__name__)

__all__ = ["OUTPUTS", "RUNNERS", "STAGES", "STAGE_PARAMS", "run", "run_one"]

RUNNERS: dict[str, ModuleType] = {
    "sample": sample, "head_types": head_types, "cache": cache, "select": select, "explain": explain,
    "simulate": simulate, "cluster": cluster, "browser": browser, "report": report,
}  # fmt: skip


# The LLM checks open (and so may create) the LLM cache file: they go last, so a run
# refused by any other check writes nothing.
_WRITING_PREFLIGHTS = ("explain", "simulate")


def preflight(cfg: Config, stages: list[str]) -> None:
    """Every check that can fail before anything is written, for the stages to run."""
    check_writable(cfg.outdir)
    ordered = [s for s in stages if s not in _WRITING_PREFLIGHTS]
    for stage in ordered + [s for s in stages if s in _WRITING_PREFLIGHTS]:
        RUNNERS[stage].preflight(cfg)


def check_skipped(cfg: Config, stage: str) -> None:
    """A skipped stage's artifacts must exist and belong to this model/params."""
    runner = RUNNERS[stage]
    if hasattr(runner, "check_reusable"):
        runner.check_reusable(cfg)
        return
    for name in OUTPUTS[stage]:
        path = out(cfg, name)
        if not path.exists():
            raise ArtifactError(f"--skip-{stage}: {path} is missing; run without --skip-{stage}")


def run_one(cfg: Config, stage: str) -> dict[str, Any]:
    return run_stage(RUNNERS[stage], cfg)


def run(cfg: Config, skipped: set[str], until: str | None = None) -> dict[str, float]:
    """Preflight every stage to run, check the reused artifacts, then run in order.

    `skipped` stages reuse their artifacts; stages after `until` are not run at all.
    Returns each run stage's wall time.
    """
    later = set(STAGES[STAGES.index(until) + 1 :]) if until else set()
    to_run = [s for s in STAGES if s not in skipped and s not in later]
    check_writable(cfg.outdir)
    for stage in STAGES:  # read-only checks of reused artifacts first
        # sample is covered by cache's check (its sample_hash); stages after `until`
        # are neither run nor needed.
        if stage in skipped and stage not in later and stage != "sample":
            check_skipped(cfg, stage)
    preflight(cfg, to_run)
    with outdir_lock(cfg.outdir):
        return _run_stages(cfg, skipped, later)


def _run_stages(cfg: Config, skipped: set[str], later: set[str]) -> dict[str, float]:
    times: dict[str, float] = {}
    for stage in STAGES:
        if stage in later:
            break
        if stage in skipped:
            log.info("stage %s: skipped, reusing its artifacts", stage)
            continue
        times[stage] = run_one(cfg, stage)["seconds"]
    return times
