"""Stage 'simulate': events + evidence + explanations -> scores.parquet.

Every explained head is simulated from its own explanation and, as the baseline, from
another head's (a seeded derangement), on the same held-out excerpts: per-token
correlation (simulate.py) and pair ROC-AUC against easy and hard negatives with the
template baseline beside them (pair_scoring.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from tqdm.auto import tqdm

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.heads import head_name
from head_explain.runners.common import (
    check_heads_match,
    cost_stop,
    fail_check,
    llm_metrics,
    out,
    progress_enabled,
    stage_meta,
    with_close,
    write_llm_calls,
    write_stage_metrics,
)

STAGE = "simulate"


def preflight(cfg: Config) -> None:
    from head_explain.llm import check_ready

    check_ready(cfg)


def check_reusable(cfg: Config) -> None:
    """For --skip-simulate: scores.parquet exists, belongs to this model, reads whole."""
    from head_explain.errors import ArtifactError

    try:
        art.check_parquet(out(cfg, "scores.parquet"), {"model": cfg.model}, full=True)
    except ArtifactError as exc:
        raise ArtifactError(f"--skip-simulate: {exc}; or run without --skip-simulate") from None


def run(cfg: Config) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from head_explain import pair_scoring, prompts, simulate
    from head_explain.evidence import read_evidence
    from head_explain.explain import clause_alone
    from head_explain.headline import beats_baselines
    from head_explain.llm import label_calls, make_backend

    events, _ = art.read_parquet(out(cfg, "events.parquet"), {"model": cfg.model})
    expl = {(r["layer"], r["head"]): r for r in art.read_jsonl(out(cfg, "explanations.jsonl"))}
    ev_heads = {(int(a), int(b)) for a, b in events[["layer", "head"]].drop_duplicates().to_numpy()}
    check_heads_match(out(cfg, "explanations.jsonl"), set(expl), ev_heads, STAGE, "events.parquet")
    backend = make_backend(cfg, "simulator")
    method = cfg.simulation_method
    if method == "auto":
        method = "echo" if backend.supports_echo() else "chat"
    template = prompts.load(simulate.ECHO_PROMPT if method == "echo" else simulate.CHAT_PROMPT)
    pair_prompts = pair_scoring.load_templates(cfg.pair_prompt)
    evidence = {
        (int(r.layer), int(r.head)): r
        for r in read_evidence(out(cfg, "evidence.parquet"), cfg.model).itertuples(index=False)
    }
    heads = sorted(expl)
    explained = [h for h in heads if expl[h]["explanation"]]
    base = simulate.baseline_assignment(explained, cfg.seed)
    groups = {k: g for k, g in events.groupby(["layer", "head"], sort=True)}
    bar = tqdm(total=len(heads), desc="simulate: heads", disable=not progress_enabled())

    async def one(key):
        label_calls(head=head_name(*key))  # for the call records
        # No partner (fewer than two explained heads): no baseline, never the head's own.
        other = base.get(key)
        has_base = other is not None and other != key
        other_text = expl[other]["explanation"] if has_base else ""
        ev = evidence.get(key)
        head_events = groups.get(key, events.iloc[:0])
        row, pairs = await asyncio.gather(
            simulate.score_head(
                backend, method, template, key[0], key[1], expl[key]["explanation"],
                other_text, head_name(*other) if has_base else "", head_events,
                cfg.excerpts_per_request,
            ),
            pair_scoring.score_pairs(
                backend, method, pair_prompts, expl[key]["explanation"], other_text,
                ev.pair_template if ev is not None else "previous_token", head_events,
                clause_alone(expl[key]),
            ),
        )  # fmt: skip
        bar.update(1)
        return {**row, "head_class": ev.head_class if ev is not None else "", **pairs}

    async def all_heads():
        return await asyncio.gather(*(one(k) for k in heads))

    try:
        rows = asyncio.run(with_close(backend, all_heads()))
    finally:
        bar.close()
        write_llm_calls(cfg, STAGE, backend)
    df = pd.DataFrame(rows)
    df["prompt_sha"] = template.sha
    df["pair_prompt"] = cfg.pair_prompt
    df["pair_prompt_sha"] = pair_prompts[method].sha
    meta = stage_meta(cfg, STAGE) | {"method": method}
    art.write_parquet(out(cfg, "scores.parquet"), df, meta)
    failed = df[df["score"].isna()]

    def nanmean(s: pd.Series) -> float | None:
        v = s.astype(float)
        return None if v.isna().all() else round(float(np.nanmean(v)), 4)

    paired = df[df["score"].notna() & df["baseline_score"].notna()]
    metrics = {
        "heads": len(df), "method": method, "failed": len(failed),
        "excerpts_per_request": cfg.excerpts_per_request,
        # both means over the heads that have both numbers (headline.paired_stats)
        "mean_score": nanmean(paired["score"]), "mean_baseline": nanmean(paired["baseline_score"]),
        "paired": len(paired),
        "prompt_sha": template.sha, **llm_metrics(backend),
        **{f"mean_{c}": nanmean(df[c]) for c in pair_scoring.AUC_COLUMNS},
        "beats_baselines_easy": beats_baselines(df, "easy"),
        "beats_baselines_hard": beats_baselines(df, "hard"),
    }  # fmt: skip
    write_stage_metrics(cfg, STAGE, metrics)
    cost_stop(cfg, STAGE, backend, len(df) - len(failed), len(df))
    fail_check(cfg, STAGE, len(failed), len(df), failed["error"].iloc[0] if len(failed) else None)
    return metrics
