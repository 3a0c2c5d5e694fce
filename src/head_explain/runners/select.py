"""Stage 'select': raw_events + windows + activations -> events.parquet (splits, excerpts)."""

from __future__ import annotations

from typing import Any

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.runners.common import out, stage_meta

STAGE = "select"


def preflight(cfg: Config) -> None:
    """Nothing beyond the config schema: select needs only earlier artifacts."""


def run(cfg: Config) -> dict[str, Any]:
    from head_explain.models import load_tokenizer
    from head_explain.select import SelectSettings, select_events

    expect = {"model": cfg.model}
    raw, _ = art.read_parquet(out(cfg, "raw_events.parquet"), expect)
    windows, _ = art.read_parquet(out(cfg, "windows.parquet"), expect)
    acts, _ = art.read_parquet(out(cfg, "activations.parquet"), expect)
    tok = load_tokenizer(cfg.model)
    settings = SelectSettings(
        topk=cfg.topk, explain_examples=cfg.explain_examples,
        score_top_examples=cfg.score_top_examples,
        score_random_examples=cfg.score_random_examples, excerpt_len=cfg.excerpt_len, seed=cfg.seed,
    )  # fmt: skip
    events = select_events(raw, windows, acts, lambda t: tok.decode([t]), settings)
    art.write_parquet(out(cfg, "events.parquet"), events, stage_meta(cfg, STAGE))
    return {"events": len(events), "by_split": events["split"].value_counts().to_dict(),
            "heads": int(events.groupby(["layer", "head"]).ngroups)}  # fmt: skip
