"""Artifact paths, atomic writes and schema-checked reads.

Every parquet artifact carries in its schema metadata the stage that wrote it, the
subject model, a hash of the params that shaped it and the schema version, so a reader
refuses a stale or foreign file with a message naming the stage to rerun. Every write
goes to a temp file in the same folder and is renamed into place: a killed stage never
leaves a truncated file that DVC would cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from head_explain.errors import ArtifactError, ConfigError

SCHEMA_VERSION = "1"

# file name -> (stage that writes it, required columns)
CONTRACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "windows.parquet": (
        "sample",
        ("window_id", "source", "doc_id", "char_start", "char_end", "tokens", "text"),
    ),
    "raw_events.parquet": (
        "cache",
        ("layer", "head", "window_id", "pos", "act", "kind", "src_pos", "src_attn", "src_write"),
    ),
    "head_stats.parquet": (
        "cache",
        (
            "layer", "head", "mean_act", "max_act", "bos_frac", "mean_attn_dist",
            "prev_token", "duplicate_token", "induction", "n_events",
        ),
    ),
    "activations.parquet": ("cache", ("layer", "head", "window_id", "acts")),
    "head_types.parquet": (
        "head_types",
        ("layer", "head", "head_name", "head_class", "class_score", "second_class"),
    ),
    "pairs.parquet": ("cache", ("layer", "head", "window_id", "rand_src", "rand_write")),
    "evidence.parquet": ("select", ("layer", "head", "head_class", "pair_template")),
    "events.parquet": (
        "select",
        ("layer", "head", "window_id", "pos", "act", "split", "rank", "src_pos", "src_attn"),
    ),
    "scores.parquet": (
        "simulate",
        (
            "layer", "head", "score", "score_top", "score_random", "baseline_score",
            "baseline_from", "method", "simulator_model", "n_tokens", "n_failed", "error",
        ),
    ),
}  # fmt: skip


def ensure_outdir(outdir: str | Path) -> Path:
    path = Path(outdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe", delete=True):
            pass
    except OSError as exc:
        raise ConfigError(
            f"key 'outdir': '{path}' is not a writable folder ({exc.strerror})"
        ) from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def write_parquet(path: str | Path, df: pd.DataFrame, meta: dict[str, str]) -> None:
    """Write `df` with provenance metadata (stage, model, config_hash) atomically."""
    name = Path(path).name
    if name in CONTRACTS:
        stage, cols = CONTRACTS[name]
        missing = [c for c in cols if c not in df.columns]
        if missing:  # a programming error, not a user error: fail loudly
            raise AssertionError(f"{name} is missing contract columns {missing}")
    table = pa.Table.from_pandas(df, preserve_index=False)
    full = {**(table.schema.metadata or {})}
    full.update(
        {f"head_explain.{k}".encode(): str(v).encode() for k, v in meta.items()}
        | {b"head_explain.schema_version": SCHEMA_VERSION.encode()}
    )
    table = table.replace_schema_metadata(full)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_meta(path: str | Path) -> dict[str, str]:
    raw = pq.read_schema(path).metadata or {}
    return {
        k.decode().removeprefix("head_explain."): v.decode()
        for k, v in raw.items()
        if k.startswith(b"head_explain.")
    }


def read_parquet(
    path: str | Path, expect: dict[str, str] | None = None, columns: list[str] | None = None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read an artifact, checking that it exists, matches its contract and `expect`.

    `expect` maps metadata keys (model, config_hash, ...) to required values.
    """
    path = Path(path)
    name = path.name
    stage = CONTRACTS.get(name, ("an earlier stage",))[0]
    if not path.exists():
        raise ArtifactError(f"{path} is missing; run the '{stage}' stage first")
    try:
        meta = read_meta(path)
    except Exception as exc:  # corrupt or not parquet
        raise ArtifactError(
            f"{path} is not a readable parquet file ({exc}); rerun '{stage}'"
        ) from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {meta.get('schema_version')!r}, this version reads "
            f"{SCHEMA_VERSION!r}; rerun the '{stage}' stage"
        )
    for key, want in (expect or {}).items():
        if meta.get(key) != str(want):
            raise ArtifactError(
                f"{path} was made with {key}={meta.get(key)!r}, not {want!r}; "
                f"rerun the '{stage}' stage"
            )
    df = pd.read_parquet(path, columns=columns)
    if name in CONTRACTS and columns is None:
        missing = [c for c in CONTRACTS[name][1] if c not in df.columns]
        if missing:
            raise ArtifactError(f"{path} lacks columns {missing}; rerun the '{stage}' stage")
    return df, meta


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} is missing; run the stage that writes it first")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}:{i} is not valid JSON; rerun the stage") from None
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in rows)
    write_text(path, text)
