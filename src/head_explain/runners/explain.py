"""Stage 'explain': events.parquet -> explanations.jsonl (one LLM call per head).

Finished heads are appended to `.explanations.jsonl.partial` as they come back, so a
killed run resumes with only the heads not yet done (their calls also come from the
LLM response cache).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tqdm.auto import tqdm

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.errors import ArtifactError
from head_explain.runners.common import (
    fail_check,
    llm_metrics,
    out,
    progress_enabled,
    with_close,
    write_stage_metrics,
)

STAGE = "explain"


def preflight(cfg: Config) -> None:
    from head_explain.llm import check_ready

    check_ready(cfg)


def explainer_name(cfg: Config) -> str:
    from head_explain.llm import model_for

    return model_for(cfg, "explainer")


def check_reusable(cfg: Config) -> None:
    """For --skip-explain: explanations.jsonl exists and was written by this explainer."""
    path = out(cfg, "explanations.jsonl")
    if not path.exists():
        raise ArtifactError(f"--skip-explain: {path} is missing; run without --skip-explain")
    rows = art.read_jsonl(path)
    if rows and rows[0].get("explainer_model") not in (None, explainer_name(cfg)):
        raise ArtifactError(
            f"--skip-explain: explanations.jsonl was written by {rows[0]['explainer_model']!r},"
            f" not {explainer_name(cfg)!r}; run without --skip-explain"
        )


def run(cfg: Config) -> dict[str, Any]:
    from head_explain import explain, prompts
    from head_explain.llm import make_backend

    events, _ = art.read_parquet(out(cfg, "events.parquet"), {"model": cfg.model})
    template = prompts.load(explain.PROMPT)
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
                with_close(
                    backend,
                    explain.explain_all(
                        backend, template, events, cfg.explain_max_tokens, on_row, set(done), bar
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
               "prompt_version": template.name, "prompt_sha": template.sha, **llm_metrics(backend)}  # fmt: skip
    write_stage_metrics(cfg, STAGE, metrics)
    fail_check(cfg, STAGE, len(failed), len(ordered), failed[0]["error"] if failed else None)
    return metrics
