"""Stage 'explain': events.parquet -> explanations.jsonl (one LLM call per head).

Finished heads are appended to `.explanations.jsonl.partial` as they come back, so a
killed run resumes with only the heads not yet done (their calls also come from the
LLM response cache).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tqdm.auto import tqdm

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.errors import ArtifactError
from head_explain.runners.common import (
    check_heads_match,
    cost_stop,
    fail_check,
    llm_metrics,
    out,
    progress_enabled,
    with_close,
    write_llm_calls,
    write_stage_metrics,
)

STAGE = "explain"
log = logging.getLogger(__name__)


def preflight(cfg: Config) -> None:
    from head_explain.llm import check_ready
    from head_explain.prompts import load_explain

    load_explain(cfg.explain_prompt)  # unknown version, unreadable or unfit file: ConfigError
    art.read_partial_jsonl(_journal_path(cfg))  # a damaged journal: refused before any stage
    check_ready(cfg)


def _journal_path(cfg: Config):
    return out(cfg, ".explanations.jsonl.partial")


def explainer_name(cfg: Config) -> str:
    from head_explain.llm import model_for

    return model_for(cfg, "explainer")


def expected_heads(cfg: Config) -> set[tuple[int, int]] | None:
    """The heads this config analyses (as the cache stage picks them); None if unknown."""
    from head_explain import models
    from head_explain.heads import choose_heads

    shape = models.head_shape(cfg.model)
    if not shape:
        return None
    heads = choose_heads(*shape, cfg.max_heads, cfg.heads)
    if cfg.head_choice == "classes" and not cfg.heads and len(heads) < shape[0] * shape[1]:
        # the cache stage picks by class from head_types.parquet (runners/cache.py)
        types_path = out(cfg, "head_types.parquet")
        if not types_path.exists():
            return None  # unknown here; the simulate stage checks against the events
        from head_explain.head_types import choose_heads_by_class

        types, _ = art.read_parquet(types_path, {"model": cfg.model})
        heads = choose_heads_by_class(types, heads, cfg.max_heads)
    return set(heads)


def check_reusable(cfg: Config) -> None:
    """For --skip-explain: explanations.jsonl meets its contract, was written by this
    explainer and covers exactly the heads this config analyses."""
    path = out(cfg, "explanations.jsonl")
    if not path.exists():
        raise ArtifactError(f"--skip-explain: {path} is missing; run without --skip-explain")
    try:
        rows = art.read_jsonl(path)
    except ArtifactError as exc:
        raise ArtifactError(f"--skip-explain: {exc}; or run without --skip-explain") from None
    if rows and rows[0].get("explainer_model") not in (None, explainer_name(cfg)):
        raise ArtifactError(
            f"--skip-explain: explanations.jsonl was written by {rows[0]['explainer_model']!r},"
            f" not {explainer_name(cfg)!r}; run without --skip-explain"
        )
    check_heads_match(path, {(r["layer"], r["head"]) for r in rows}, expected_heads(cfg),
                      "--skip-explain", "the heads this config analyses")  # fmt: skip


def run(cfg: Config) -> dict[str, Any]:
    from head_explain import explain, prompts
    from head_explain.evidence import read_evidence
    from head_explain.llm import make_backend

    events, _ = art.read_parquet(out(cfg, "events.parquet"), {"model": cfg.model})
    template = prompts.load_explain(cfg.explain_prompt)
    ev_df = read_evidence(out(cfg, "evidence.parquet"), cfg.model)
    evidence = {(int(r["layer"]), int(r["head"])): r for r in ev_df.to_dict("records")}
    final = out(cfg, "explanations.jsonl")
    partial = _journal_path(cfg)
    journal, torn = art.read_partial_jsonl(partial)  # damage before the last line: refused
    if torn:
        log.warning("explain: dropped the cut-off last line of %s; that head is redone", partial)
    backend = make_backend(cfg, "explainer")
    # Heads finished by an earlier, interrupted run with the same model and prompt.
    done = {
        (r["layer"], r["head"]): r
        for r in journal
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
                with_close(
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
            write_llm_calls(cfg, STAGE, backend)
    ordered = [rows[k] for k in sorted(rows)]
    art.write_jsonl(final, ordered)
    failed = [r for r in ordered if r["error"]]
    if not failed:  # kept otherwise: a rerun with llm_cache=off still skips finished heads
        partial.unlink(missing_ok=True)
    metrics = {"heads": len(ordered), "failed": len(failed), "resumed": len(done),
               "prompt_version": template.name, "prompt_sha": template.sha, **llm_metrics(backend)}  # fmt: skip
    write_stage_metrics(cfg, STAGE, metrics)
    cost_stop(cfg, STAGE, backend, len(ordered) - len(failed), len(ordered))
    fail_check(cfg, STAGE, len(failed), len(ordered), failed[0]["error"] if failed else None)
    return metrics
