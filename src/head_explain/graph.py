"""The stage graph: order, the params each stage reads, what it reads and writes.

`dvc.yaml` is generated from this table plus each stage's imports
(`python tools/dvc_yaml.py --write`); `tests/test_dvc_yaml.py` fails when they differ.
Each stage lists only the params that change its outputs, so `dvc exp run -S topk=300`
reruns select and what follows, never sample or cache. Operational knobs
(concurrency, timeouts, retries, the LLM cache path) change no result and are left out
on purpose.
"""

from __future__ import annotations

STAGES = (
    "sample", "head_types", "cache", "select", "explain", "simulate", "cluster", "browser",
    "report",
)  # fmt: skip

# The stage's DVC entry script (select_events.py: a script named select.py would shadow
# the stdlib `select` module that DVC itself imports).
SCRIPTS: dict[str, str] = {s: f"stages/{s}.py" for s in STAGES} | {
    "select": "stages/select_events.py"
}

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
        "candidates", "max_events_per_window", "min_event_pos", "top_sources",
        "random_windows", "seed",
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
        "pair_prompt", "excerpts_per_request", "seed", "max_failed_fraction",
    ],
    "cluster": ["embedding_model", "min_cluster_size"],
    # the browser re-reads one excerpt's attention rows with the subject model, and
    # embeds explanations for nearest heads
    "browser": ["model", "device", "dtype", "embedding_model"],
    "report": ["mlflow_experiment"],
}  # fmt: skip

# Artifacts each stage reads (outputs of earlier stages).
INPUTS: dict[str, list[str]] = {
    "sample": [],
    "head_types": ["windows.parquet"],
    "cache": ["windows.parquet", "head_types.parquet"],
    "select": [
        "windows.parquet", "raw_events.parquet", "activations.parquet", "head_types.parquet",
        "pairs.parquet",
    ],
    "explain": ["events.parquet", "evidence.parquet"],
    "simulate": ["events.parquet", "evidence.parquet", "explanations.jsonl"],
    "cluster": ["explanations.jsonl", "scores.parquet"],
    "browser": [
        "windows.parquet", "head_types.parquet", "head_stats.parquet", "events.parquet",
        "evidence.parquet", "explanations.jsonl", "scores.parquet", "clusters.json",
    ],
    "report": [
        "events.parquet", "explanations.jsonl", "scores.parquet", "head_stats.parquet",
        "head_types.parquet", "evidence.parquet", "clusters.json", "browser",
    ],
}  # fmt: skip

OUTPUTS: dict[str, list[str]] = {
    "sample": ["windows.parquet"],
    "head_types": ["head_types.parquet"],
    "cache": ["raw_events.parquet", "head_stats.parquet", "activations.parquet", "pairs.parquet"],
    "select": ["events.parquet", "evidence.parquet"],
    # llm_calls/: one record per LLM request (for MLflow traces); cached DVC outputs, so
    # a queued experiment's fresh checkout has them
    "explain": ["explanations.jsonl", "llm_calls/explain.jsonl"],
    "simulate": ["scores.parquet", "llm_calls/simulate.jsonl"],
    "cluster": ["clusters.json"],
    "browser": ["browser"],
    "report": [
        "report.md",
        "summary.csv",
        "metrics.json",
        "mlflow_run.json",
        "plots/score_map.png",
        "plots/score_hist.png",
    ],
}

# The one DVC metrics file: the headline of a run (`dvc exp show`, `dvc metrics diff`).
# Per-stage metrics (metrics/<stage>.json: timings, counts, hashes) are plain outputs.
METRICS = ("report", "metrics.json")

# `dvc plots show` / `dvc plots diff <exp>`: data file under outdir/plot_data (written
# by the report stage) -> (x, y columns, DVC template, title).
PLOT_DATA = "plot_data"
PLOTS: dict[str, tuple[str, list[str], str, str]] = {
    "head_scores.csv": (
        "position", ["score", "baseline"], "scatter",
        "Per-head score: explanation vs shuffled baseline (x = layer + head/heads)",
    ),
    "head_lift.csv": (
        "position", ["lift_easy", "lift_hard"], "scatter",
        "Per-head pair-AUC lift over the template (x = layer + head/heads)",
    ),
    "score_hist.csv": (
        "bin", ["explanation", "baseline"], "linear", "Score histogram (heads per bin)",
    ),
    "layer_means.csv": ("layer", ["score", "baseline"], "linear", "Per-layer mean score"),
}  # fmt: skip

# Outputs DVC keeps out of its cache (small, rewritten every run, read by DVC itself).
# Every uncached output must be in git (.gitignore lets outputs/metrics/ and plot_data/
# through): a queued experiment runs in a fresh checkout, where a missing uncached output
# would make its stage rerun from scratch.
UNCACHED: dict[str, list[str]] = {
    "report": [f"{PLOT_DATA}/{name}" for name in PLOTS],
}

# Non-Python files of the package a stage reads (prompt templates), as globs under
# src/head_explain: every shipped version is a dep, since a param picks among them.
DATA_FILES: dict[str, list[str]] = {
    "explain": ["prompts/explain_*.txt"],
    "simulate": ["prompts/simulate_*.txt", "prompts/pairs_*.txt"],
    "browser": ["browser/assets/*"],
    "report": ["templates/*.j2"],
}
