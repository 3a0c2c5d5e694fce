"""Stage 'select': raw_events + windows + activations + head_types + pairs ->
events.parquet (splits, excerpts, marked pairs) and evidence.parquet (per head)."""

from __future__ import annotations

from typing import Any

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.runners.common import out, stage_meta

STAGE = "select"


def preflight(cfg: Config) -> None:
    """Nothing beyond the config schema: select needs only earlier artifacts."""


def run(cfg: Config) -> dict[str, Any]:
    from head_explain.evidence import build_evidence
    from head_explain.models import load_tokenizer
    from head_explain.select import SelectSettings, add_pairs, explain_pools, select_events
    from head_explain.token_display import display_tokens

    expect = {"model": cfg.model}
    raw, _ = art.read_parquet(out(cfg, "raw_events.parquet"), expect)
    windows, _ = art.read_parquet(out(cfg, "windows.parquet"), expect)
    acts, _ = art.read_parquet(out(cfg, "activations.parquet"), expect)
    types, _ = art.read_parquet(out(cfg, "head_types.parquet"), expect)
    pairs, _ = art.read_parquet(out(cfg, "pairs.parquet"), expect)
    art.check_same_run([out(cfg, n) for n in ("raw_events.parquet", "activations.parquet")])
    tok = load_tokenizer(cfg.model)
    settings = SelectSettings(
        topk=cfg.topk, explain_examples=cfg.explain_examples,
        score_top_examples=cfg.score_top_examples,
        score_random_examples=cfg.score_random_examples, excerpt_len=cfg.excerpt_len, seed=cfg.seed,
    )  # fmt: skip
    events = select_events(raw, windows, acts, lambda ids: display_tokens(tok, ids), settings)
    # Evidence from the top events minus the held-out scoring windows (no leak).
    pools = explain_pools(raw, events, cfg.topk)
    evidence = build_evidence(pools, windows, lambda t: tok.decode([t]), types)
    templates = {(int(r.layer), int(r.head)): r.pair_template for r in evidence.itertuples()}
    events = add_pairs(events, pairs, raw, templates, cfg.seed, cfg.topk)
    art.write_parquet_set(  # both or neither
        {out(cfg, "events.parquet"): events, out(cfg, "evidence.parquet"): evidence},
        stage_meta(cfg, STAGE),
    )
    labels = [lab for labs in events["pair_label"] for lab in labs]
    return {"events": len(events), "by_split": events["split"].value_counts().to_dict(),
            "heads": int(events.groupby(["layer", "head"]).ngroups),
            "pairs": {k: labels.count(k) for k in ("pos", "easy", "hard")},
            "head_classes": evidence["head_class"].value_counts().to_dict()}  # fmt: skip
