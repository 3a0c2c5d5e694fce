"""Read whatever artifacts a run has produced, tolerating the ones it has not.

The browser shows what exists: a run stopped after `cache` still gets a grid of its
heads, and artifacts of later issues (head_types.parquet, evidence, pair scores) are
picked up by name when present. Every reader returns None for a missing file and logs
one line; a file that exists but cannot be read is also skipped with a warning (the
browser is a view, never the reason a run fails).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from head_explain.artifacts import read_jsonl, read_meta, read_parquet

log = logging.getLogger(__name__)

# Optional artifacts of the head-aware stages, by the names the design notes give them.
HEAD_TYPES = "head_types.parquet"
EVIDENCE_FILES = ("evidence.parquet", "head_evidence.parquet", "evidence.jsonl")
PATTERNS = "attention_patterns.parquet"


def _parquet(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        log.info("browser: %s is absent; its part of the view is left out", path.name)
        return None
    try:
        return read_parquet(path)[0]
    except Exception as exc:  # stale or foreign: show the rest rather than fail
        log.warning("browser: %s skipped (%s)", path.name, exc)
        return None


def _json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("browser: %s skipped (%s)", path.name, exc)
        return None


def _jsonl(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    try:
        return read_jsonl(path)
    except Exception as exc:
        log.warning("browser: %s skipped (%s)", path.name, exc)
        return None


def _evidence(outdir: Path) -> pd.DataFrame | None:
    for name in EVIDENCE_FILES:
        path = outdir / name
        if not path.exists():
            continue
        if name.endswith(".jsonl"):
            rows = _jsonl(path)
            return pd.DataFrame(rows) if rows else None
        return _parquet(path)
    return None


def grid_shape(inputs: dict[str, Any]) -> tuple[int, int]:
    """(layers, heads per layer): head_types, else the model config, else what was seen."""
    ht = inputs.get("head_types")
    if ht is not None and len(ht):
        return int(ht["layer"].max()) + 1, int(ht["head"].max()) + 1
    shape = inputs.get("model_shape")
    if shape:
        return int(shape[0]), int(shape[1])
    cache = (inputs.get("stage_metrics") or {}).get("cache") or {}
    ms = cache.get("model_shape") or {}
    if ms.get("layers") and ms.get("heads"):
        return int(ms["layers"]), int(ms["heads"])
    layers, heads = 0, 0
    for key in ("head_stats", "scores", "events"):
        df = inputs.get(key)
        if df is not None and len(df):
            layers = max(layers, int(df["layer"].max()) + 1)
            heads = max(heads, int(df["head"].max()) + 1)
    for r in inputs.get("explanations") or []:
        layers, heads = max(layers, int(r["layer"]) + 1), max(heads, int(r["head"]) + 1)
    return layers, heads


def model_name(inputs: dict[str, Any]) -> str:
    for key in ("head_stats", "events", "scores", "head_types"):
        meta = (inputs.get("meta") or {}).get(key) or {}
        if meta.get("model"):
            return meta["model"]
    return ""


def load_inputs(outdir: str | Path) -> dict[str, Any]:
    """Every artifact the browser can show, None where absent."""
    outdir = Path(outdir)
    inputs: dict[str, Any] = {"meta": {}}
    for key, name in (
        ("windows", "windows.parquet"),
        ("head_stats", "head_stats.parquet"),
        ("events", "events.parquet"),
        ("scores", "scores.parquet"),
        ("head_types", HEAD_TYPES),
        ("patterns", PATTERNS),
    ):
        inputs[key] = _parquet(outdir / name)
        if inputs[key] is not None:
            try:
                inputs["meta"][key] = read_meta(outdir / name)
            except Exception:  # metadata is a nicety here
                inputs["meta"][key] = {}
    inputs["evidence"] = _evidence(outdir)
    inputs["explanations"] = _jsonl(outdir / "explanations.jsonl")
    inputs["clusters"] = _json(outdir / "clusters.json")
    inputs["stage_metrics"] = {
        p.stem: m for p in sorted((outdir / "metrics").glob("*.json")) if (m := _json(p))
    }
    return inputs
