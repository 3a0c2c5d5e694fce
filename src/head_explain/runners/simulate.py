"""Stage 'simulate': events + explanations -> scores.parquet.

Every explained head is simulated from its own explanation and, as the baseline, from
another head's (a seeded derangement), on the same held-out excerpts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tqdm.auto import tqdm

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.heads import head_name
from head_explain.runners.common import (
    fail_check,
    llm_metrics,
    out,
    progress_enabled,
    stage_meta,
    with_close,
    write_stage_metrics,
)

STAGE = "simulate"


def preflight(cfg: Config) -> None:
    from head_explain.llm import check_ready

    check_ready(cfg)


def check_reusable(cfg: Config) -> None:
    """For --skip-simulate: scores.parquet exists and belongs to this model."""
    art.read_parquet(out(cfg, "scores.parquet"), {"model": cfg.model})


def run(cfg: Config) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from head_explain import prompts, simulate
    from head_explain.llm import make_backend

    events, _ = art.read_parquet(out(cfg, "events.parquet"), {"model": cfg.model})
    expl = {(r["layer"], r["head"]): r for r in art.read_jsonl(out(cfg, "explanations.jsonl"))}
    backend = make_backend(cfg, "simulator")
    method = cfg.simulation_method
    if method == "auto":
        method = "echo" if backend.supports_echo() else "chat"
    template = prompts.load(simulate.ECHO_PROMPT if method == "echo" else simulate.CHAT_PROMPT)
    heads = sorted(expl)
    explained = [h for h in heads if expl[h]["explanation"]]
    base = simulate.baseline_assignment(explained, cfg.seed)
    groups = {k: g for k, g in events.groupby(["layer", "head"], sort=True)}
    bar = tqdm(total=len(heads), desc="simulate: heads", disable=not progress_enabled())

    async def one(key):
        other = base.get(key, key)
        row = await simulate.score_head(
            backend, method, template, key[0], key[1], expl[key]["explanation"],
            expl[other]["explanation"], head_name(*other), groups.get(key, events.iloc[:0]),
        )  # fmt: skip
        bar.update(1)
        return row

    async def all_heads():
        return await asyncio.gather(*(one(k) for k in heads))

    try:
        rows = asyncio.run(with_close(backend, all_heads()))
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    df["prompt_sha"] = template.sha
    meta = stage_meta(cfg, STAGE) | {"method": method}
    art.write_parquet(out(cfg, "scores.parquet"), df, meta)
    failed = df[df["score"].isna()]

    def nanmean(s: pd.Series) -> float | None:
        v = s.astype(float)
        return None if v.isna().all() else round(float(np.nanmean(v)), 4)

    metrics = {
        "heads": len(df), "method": method, "failed": len(failed),
        "mean_score": nanmean(df["score"]), "mean_baseline": nanmean(df["baseline_score"]),
        "prompt_sha": template.sha, **llm_metrics(backend),
    }  # fmt: skip
    write_stage_metrics(cfg, STAGE, metrics)
    fail_check(cfg, STAGE, len(failed), len(df), failed["error"].iloc[0] if len(failed) else None)
    return metrics
