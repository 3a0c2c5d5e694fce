"""Stage order, the stage functions (shared by the CLI and DVC), timing and metrics.

Each stage reads only earlier artifacts and its own params, writes its outputs
atomically, and leaves `metrics/<stage>.json` with its counts and wall time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from head_explain import artifacts as art
from head_explain.config import Config, config_hash, source_list
from head_explain.errors import ArtifactError, ConfigError, StageFailed
from head_explain.heads import head_name

log = logging.getLogger(__name__)

STAGES = ("sample", "head_types", "cache", "select", "explain", "simulate", "cluster", "report")

# The params each stage reads that change its outputs: dvc.yaml lists exactly these,
# and their hash is stamped into the stage's artifacts. Operational knobs (concurrency,
# timeouts, retries, the LLM cache path) change no result and are left out on purpose.
STAGE_PARAMS: dict[str, list[str]] = {
    "sample": [
        "model", "sources", "wikitext_dir", "wikitext_config", "wikitext_split",
        "stackexchange_dir", "data_files", "windows", "window_len", "seed",
    ],
    "head_types": [
        "model", "device", "dtype", "batch_size", "type_windows", "class_previous_token",
        "class_induction", "class_duplicate_token", "class_self", "class_fixed_offset",
        "class_bos_sink", "seed",
    ],
    "cache": [
        "model", "device", "dtype", "batch_size", "heads", "max_heads", "head_choice",
        "candidates", "max_events_per_window", "top_sources", "random_windows", "seed",
    ],
    "select": [
        "topk", "explain_examples", "score_top_examples", "score_random_examples",
        "excerpt_len", "seed",
    ],
    "explain": [
        "llm", "openai_model", "openai_base_url", "explain_max_tokens", "explain_prompt",
        "max_failed_fraction",
    ],
    "simulate": [
        "llm", "openai_model", "openai_base_url", "simulator_model", "simulation_method",
        "seed", "max_failed_fraction",
    ],
    "cluster": ["embedding_model", "min_cluster_size"],
    "report": ["mlflow_experiment"],
}  # fmt: skip

OUTPUTS: dict[str, list[str]] = {
    "sample": ["windows.parquet"],
    "head_types": ["head_types.parquet"],
    "cache": ["raw_events.parquet", "head_stats.parquet", "activations.parquet", "pairs.parquet"],
    "select": ["events.parquet", "evidence.parquet"],
    "explain": ["explanations.jsonl"],
    "simulate": ["scores.parquet"],
    "cluster": ["clusters.json"],
    "report": ["report.md", "summary.csv", "metrics.json", "mlflow_run.json"],
}


def out(cfg: Config, name: str) -> Path:
    return Path(cfg.outdir) / name


def _meta(cfg: Config, stage: str) -> dict[str, str]:
    return {
        "stage": stage,
        "model": cfg.model,
        "config_hash": config_hash(cfg, STAGE_PARAMS[stage]),
    }


def _expect(cfg: Config, stage: str) -> dict[str, str]:
    return {"model": cfg.model, "config_hash": config_hash(cfg, STAGE_PARAMS[stage])}


def write_stage_metrics(cfg: Config, stage: str, metrics: dict[str, Any]) -> None:
    art.write_json(out(cfg, f"metrics/{stage}.json"), {"stage": stage, **metrics})


def progress_enabled() -> bool:
    return os.environ.get("HEAD_EXPLAIN_PROGRESS", "1") != "0"


# ------------------------------------------------------------------ preflight
def preflight(cfg: Config, stages: list[str]) -> None:
    """Every check that can fail before anything is written."""
    from head_explain import models

    _check_writable(cfg.outdir)
    if "cluster" in stages:
        from head_explain.cluster import check_embedding_model

        check_embedding_model(cfg.embedding_model)
    # Cheapest first: the corpus paths need no torch import, the model checks do.
    if "sample" in stages:
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
    if "sample" in stages or "cache" in stages:
        models.resolve_device(cfg.device)
        models.resolve_dtype(cfg.dtype, models.resolve_device(cfg.device))
        ctx = models.context_length(cfg.model)
        if cfg.window_len > ctx:
            raise ConfigError(
                f"key 'window_len': {cfg.window_len} exceeds {cfg.model}'s context of {ctx} "
                f"tokens; use at most {ctx}"
            )
    if "cache" in stages and cfg.heads:  # a head the model lacks: refuse before sampling
        from head_explain.heads import choose_heads

        shape = models.head_shape(cfg.model)
        if shape:
            choose_heads(*shape, cfg.max_heads, cfg.heads)
    if "explain" in stages or "simulate" in stages:
        from head_explain.llm import check_ready

        check_ready(cfg)


def _check_writable(outdir: str) -> None:
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


# ------------------------------------------------------------------ stages
def run_sample(cfg: Config) -> dict[str, Any]:
    from head_explain.data.windows import sample_windows
    from head_explain.models import bos_id, load_tokenizer

    tok = load_tokenizer(cfg.model)
    df = sample_windows(cfg, tok, bos_id(tok))
    art.ensure_outdir(cfg.outdir)
    art.write_parquet(out(cfg, "windows.parquet"), df, _meta(cfg, "sample"))
    return {"windows": len(df), "tokens": int(len(df) * cfg.window_len),
            "by_source": df["source"].value_counts().to_dict()}  # fmt: skip


def run_cache(cfg: Config) -> dict[str, Any]:
    from head_explain.activations import CacheSettings, HeadActivationCache, choose_random_windows
    from head_explain.heads import choose_heads
    from head_explain.models import load_bridge

    windows, _ = art.read_parquet(out(cfg, "windows.parquet"), _expect(cfg, "sample"))
    bridge, _ = load_bridge(cfg.model, cfg.device, cfg.dtype)
    heads = choose_heads(bridge.cfg.n_layers, bridge.cfg.n_heads, cfg.max_heads, cfg.heads)
    if (
        cfg.head_choice == "classes"
        and not cfg.heads
        and len(heads) < bridge.cfg.n_layers * bridge.cfg.n_heads
    ):
        from head_explain.head_types import choose_heads_by_class

        types, _ = art.read_parquet(out(cfg, "head_types.parquet"), {"model": cfg.model})
        heads = choose_heads_by_class(types, heads, cfg.max_heads)
        cls = dict(
            zip(zip(types["layer"], types["head"], strict=True), types["head_class"], strict=True)
        )
        log.info("cache: heads by class: %s", {head_name(*h): cls.get(h) for h in heads})
    settings = CacheSettings(
        candidates=cfg.candidates, max_events_per_window=cfg.max_events_per_window,
        top_sources=cfg.top_sources, batch_size=cfg.batch_size, seed=cfg.seed,
        random_window_ids=choose_random_windows(len(windows), cfg.random_windows, cfg.seed),
    )  # fmt: skip
    tokens = np.stack(windows["tokens"].to_numpy())
    result = HeadActivationCache(bridge, heads, settings).run(
        tokens, windows["window_id"].to_numpy(), progress=progress_enabled()
    )
    meta = _meta(cfg, "cache") | {"sample_hash": config_hash(cfg, STAGE_PARAMS["sample"])}
    for name, df in (
        ("raw_events.parquet", result.raw_events),
        ("head_stats.parquet", result.head_stats),
        ("activations.parquet", result.activations),
        ("pairs.parquet", result.pairs),
    ):
        art.write_parquet(out(cfg, name), df, meta)
    return {
        "heads": [head_name(layer, head) for layer, head in heads],
        "n_heads": len(heads),
        "model_shape": {"layers": bridge.cfg.n_layers, "heads": bridge.cfg.n_heads},
        "events": len(result.raw_events),
        "tokens": result.tokens,
        "tokens_per_s": round(result.tokens / max(result.seconds, 1e-9), 1),
    }


def check_cache_artifacts(cfg: Config) -> None:
    """For --skip-cache: the sample/cache artifacts exist and match model and params."""
    sample_hash = config_hash(cfg, STAGE_PARAMS["sample"])
    wants: dict[str, tuple[str, dict[str, str]]] = {
        "windows.parquet": ("sample", {"model": cfg.model, "config_hash": sample_hash})
    }
    for name in OUTPUTS["cache"]:
        wants[name] = ("cache", _expect(cfg, "cache") | {"sample_hash": sample_hash})
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


def run_select(cfg: Config) -> dict[str, Any]:
    from head_explain.models import load_tokenizer
    from head_explain.select import SelectSettings, select_events

    expect = {"model": cfg.model}
    raw, meta = art.read_parquet(out(cfg, "raw_events.parquet"), expect)
    windows, _ = art.read_parquet(out(cfg, "windows.parquet"), expect)
    acts, _ = art.read_parquet(out(cfg, "activations.parquet"), expect)
    tok = load_tokenizer(cfg.model)
    settings = SelectSettings(
        topk=cfg.topk, explain_examples=cfg.explain_examples,
        score_top_examples=cfg.score_top_examples,
        score_random_examples=cfg.score_random_examples, excerpt_len=cfg.excerpt_len, seed=cfg.seed,
    )  # fmt: skip
    events = select_events(raw, windows, acts, lambda t: tok.decode([t]), settings)
    events, evidence = _head_evidence(cfg, raw, windows, events, lambda t: tok.decode([t]))
    art.write_parquet(out(cfg, "events.parquet"), events, _meta(cfg, "select"))
    art.write_parquet(out(cfg, "evidence.parquet"), evidence, _meta(cfg, "select"))
    return {"events": len(events), "by_split": events["split"].value_counts().to_dict(),
            "heads": int(events.groupby(["layer", "head"]).ngroups)}  # fmt: skip


def _head_evidence(cfg: Config, raw, windows, events, token_text):
    """evidence.parquet (from head_types.parquet and the explain pools) and the marked
    pairs of every scoring excerpt (from pairs.parquet)."""
    from head_explain.evidence import build_evidence
    from head_explain.select import add_pairs, explain_pools

    expect = {"model": cfg.model}
    types, _ = art.read_parquet(out(cfg, "head_types.parquet"), expect)
    pairs, _ = art.read_parquet(out(cfg, "pairs.parquet"), expect)
    evidence = build_evidence(explain_pools(raw, events, cfg.topk), windows, token_text, types)
    templates = {(int(r.layer), int(r.head)): r.pair_template for r in evidence.itertuples()}
    return add_pairs(events, pairs, raw, templates, cfg.seed), evidence


def _read_evidence(cfg: Config) -> pd.DataFrame:
    """evidence.parquet, or no rows (with a warning) in an outdir made without it: the
    explainer then gets no evidence block and pair scoring no class template."""
    path = out(cfg, "evidence.parquet")
    if not path.exists():
        log.warning("%s is missing: explaining and scoring without head evidence", path)
        return pd.DataFrame(columns=["layer", "head", "head_class", "pair_template"])
    return art.read_parquet(path, {"model": cfg.model})[0]


def _llm_metrics(backend) -> dict[str, Any]:
    return {"model": backend.model, "backend": backend.kind, "llm": backend.stats.as_dict()}


def _fail_check(cfg: Config, stage: str, n_failed: int, n_total: int, first: str | None) -> None:
    if n_total and n_failed / n_total > cfg.max_failed_fraction:
        raise StageFailed(
            f"{stage}: {n_failed}/{n_total} heads failed (max_failed_fraction="
            f"{cfg.max_failed_fraction}); first error: {first}. Finished heads are kept; "
            "rerun to retry transient failures (answers already received, unusable ones included, "
            "come from the cache)"
        )


def run_explain(cfg: Config) -> dict[str, Any]:
    from head_explain import explain, prompts
    from head_explain.llm import make_backend

    events, _ = art.read_parquet(out(cfg, "events.parquet"), {"model": cfg.model})
    template = prompts.load_explain(cfg.explain_prompt)
    ev_df = _read_evidence(cfg)
    evidence = {(int(r["layer"]), int(r["head"])): r for r in ev_df.to_dict("records")}
    backend = make_backend(cfg, "explainer")
    final = out(cfg, "explanations.jsonl")
    partial = final.with_name(".explanations.jsonl.partial")
    # Heads finished by an earlier, interrupted run with the same model and prompt.
    done = {
        (r["layer"], r["head"]): r
        for r in (art.read_jsonl(partial) if partial.exists() else [])
        if r.get("explainer_model") == backend.model and r.get("prompt_sha") == template.sha
        and not r.get("error")
    }  # fmt: skip
    wanted = {
        (int(a), int(b))
        for a, b in events[["layer", "head"]].drop_duplicates().itertuples(index=False)
    }
    done = {k: v for k, v in done.items() if k in wanted}
    rows = dict(done)
    with open(partial, "w") as fh:
        for r in done.values():
            fh.write(json.dumps(r, sort_keys=True) + "\n")
        fh.flush()

        def on_row(row):
            rows[(row["layer"], row["head"])] = row
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()  # a crash keeps every finished head

        bar = tqdm(
            total=len(wanted) - len(done), desc="explain: heads", disable=not progress_enabled()
        )
        try:
            asyncio.run(
                _with_close(
                    backend,
                    explain.explain_all(
                        backend,
                        template,
                        events,
                        cfg.explain_max_tokens,
                        on_row,
                        set(done),
                        bar,
                        evidence,
                    ),
                )
            )
        finally:
            bar.close()
    ordered = [rows[k] for k in sorted(rows)]
    art.write_jsonl(final, ordered)
    failed = [r for r in ordered if r["error"]]
    if not failed:  # kept otherwise: a rerun with llm_cache=off still skips finished heads
        partial.unlink(missing_ok=True)
    metrics = {"heads": len(ordered), "failed": len(failed), "resumed": len(done),
               "prompt_version": template.name, "prompt_sha": template.sha, **_llm_metrics(backend)}  # fmt: skip
    write_stage_metrics(cfg, "explain", metrics)
    _fail_check(cfg, "explain", len(failed), len(ordered), failed[0]["error"] if failed else None)
    return metrics


async def _with_close(backend, coro):
    try:
        return await coro
    finally:
        await backend.aclose()


def run_simulate(cfg: Config) -> dict[str, Any]:
    from head_explain import pair_scoring, prompts, simulate
    from head_explain.headline import beats_baselines
    from head_explain.llm import make_backend

    events, _ = art.read_parquet(out(cfg, "events.parquet"), {"model": cfg.model})
    expl = {(r["layer"], r["head"]): r for r in art.read_jsonl(out(cfg, "explanations.jsonl"))}
    backend = make_backend(cfg, "simulator")
    method = cfg.simulation_method
    if method == "auto":
        method = "echo" if backend.supports_echo() else "chat"
    template = prompts.load(simulate.ECHO_PROMPT if method == "echo" else simulate.CHAT_PROMPT)
    pair_prompts = {"echo": prompts.load("pairs_echo_v1"), "chat": prompts.load("pairs_chat_v1")}
    evidence = {(int(r.layer), int(r.head)): r for r in _read_evidence(cfg).itertuples(index=False)}
    heads = sorted(expl)
    explained = [h for h in heads if expl[h]["explanation"]]
    base = simulate.baseline_assignment(explained, cfg.seed)
    groups = {k: g for k, g in events.groupby(["layer", "head"], sort=True)}
    bar = tqdm(total=len(heads), desc="simulate: heads", disable=not progress_enabled())

    async def one(key):
        other = base.get(key, key)
        ev = evidence.get(key)
        head_events = groups.get(key, events.iloc[:0])
        row, pairs = await asyncio.gather(
            simulate.score_head(
                backend, method, template, key[0], key[1], expl[key]["explanation"],
                expl[other]["explanation"], head_name(*other), head_events,
            ),
            pair_scoring.score_pairs(
                backend, method, pair_prompts, expl[key]["explanation"],
                expl[other]["explanation"] if other != key else "",
                ev.pair_template if ev is not None else "previous_token", head_events,
            ),
        )  # fmt: skip
        bar.update(1)
        return {**row, "head_class": ev.head_class if ev is not None else "", **pairs}

    async def all_heads():
        return await asyncio.gather(*(one(k) for k in heads))

    try:
        rows = asyncio.run(_with_close(backend, all_heads()))
    finally:
        bar.close()
    df = pd.DataFrame(rows)
    df["prompt_sha"] = template.sha
    meta = _meta(cfg, "simulate") | {"method": method}
    art.write_parquet(out(cfg, "scores.parquet"), df, meta)
    failed = df[df["score"].isna()]
    metrics = {
        "heads": len(df), "method": method, "failed": len(failed),
        "mean_score": _nanmean(df["score"]), "mean_baseline": _nanmean(df["baseline_score"]),
        "prompt_sha": template.sha, **_llm_metrics(backend),
        **{f"mean_{c}": _nanmean(df[c]) for c in PAIR_COLUMNS},
        "beats_baselines_easy": beats_baselines(df, "easy"),
        "beats_baselines_hard": beats_baselines(df, "hard"),
    }  # fmt: skip
    write_stage_metrics(cfg, "simulate", metrics)
    _fail_check(
        cfg, "simulate", len(failed), len(df), failed["error"].iloc[0] if len(failed) else None
    )
    return metrics


PAIR_COLUMNS = [
    f"{k}_auc_{n}" for k in ("pair", "template", "shuffled") for n in ("easy", "hard")
] + ["lift_easy", "lift_hard"]


def _nanmean(s: pd.Series) -> float | None:
    v = s.astype(float)
    return None if v.isna().all() else round(float(np.nanmean(v)), 4)


def run_cluster(cfg: Config) -> dict[str, Any]:
    from head_explain.cluster import run_cluster as cluster_stage

    return cluster_stage(cfg)


def run_report(cfg: Config) -> dict[str, Any]:
    from head_explain.report import run_report as report_stage
    from head_explain.tracking import log_run

    metrics = report_stage(cfg)
    run_id = log_run(cfg, cfg.outdir, metrics)
    return {**metrics, "mlflow_run_id": run_id}


def run_head_types(cfg: Config) -> dict[str, Any]:
    from head_explain.head_types_stage import run_head_types as head_types_stage

    return head_types_stage(cfg)


RUNNERS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "sample": run_sample, "head_types": run_head_types, "cache": run_cache, "select": run_select, "explain": run_explain,
    "simulate": run_simulate, "cluster": run_cluster, "report": run_report,
}  # fmt: skip


def run_stage(cfg: Config, stage: str) -> dict[str, Any]:
    """Run one stage, time it, and write its metrics JSON (if the stage did not)."""
    log.info("stage %s: starting", stage)
    t0 = time.time()
    metrics = RUNNERS[stage](cfg)
    seconds = round(time.time() - t0, 2)
    # explain/simulate also wrote their metrics themselves (so a StageFailed run keeps
    # them); they return that same dict, so adding the time here is all that is left.
    metrics = {**metrics, "seconds": seconds}
    write_stage_metrics(cfg, stage, {k: v for k, v in metrics.items() if k != "stage"})
    log.info("stage %s: done in %.1fs", stage, seconds)
    return metrics
