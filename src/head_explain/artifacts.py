"""Artifact paths, atomic writes and schema-checked reads.

Every parquet artifact carries in its schema metadata the stage that wrote it, the
subject model, a hash of the params that shaped it and the schema version, so a reader
refuses a stale or foreign file with a message naming the stage to rerun. Every write
goes to a temp file in the same folder and is renamed into place: a killed stage never
leaves a truncated file that DVC would cache. A stage with several outputs writes them
all to temp files first and renames them only when every one is complete, each stamped
with one shared run token, so a reader refuses a set mixed from two runs. Every read
checks the file against its contract (columns and their types, JSON row fields) and
turns any decoding failure into an ArtifactError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from head_explain.errors import ArtifactError, ConfigError
from head_explain.json_artifacts import (  # noqa: F401  (re-exported: art.read_jsonl, ...)
    JSON_CONTRACTS,
    JSONL_CONTRACTS,
    read_json,
    read_jsonl,
    read_partial_jsonl,
)
from head_explain.json_artifacts import _stage_of as json_stage_of

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

# Column kinds checked on read (a foreign file with the right names but wrong types).
COLUMN_KINDS: dict[str, str] = {
    "layer": "int", "head": "int", "window_id": "int", "pos": "int", "act": "float",
    "tokens": "list", "text": "str", "acts": "list", "src_pos": "list", "score": "float",
    "baseline_score": "float", "split": "str", "kind": "str", "source": "str",
}  # fmt: skip

RUN_TOKEN = "run_token"


def _stage_of(name: str) -> str:
    return CONTRACTS[name][0] if name in CONTRACTS else json_stage_of(name)


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_paths(paths: list[str | Path]) -> Iterator[list[Path]]:
    """Temp paths beside each of `paths`; all renamed into place only when the block
    succeeds (none on an error, e.g. a full disk while writing the last one)."""
    paths = [Path(p) for p in paths]
    tmps: list[str] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmps.append(tmp)
        yield [Path(t) for t in tmps]
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; outputs follow the umask like any tool's
        for tmp in tmps:
            if os.path.exists(tmp):
                os.chmod(tmp, mode)
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it into place only on success."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


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
    write_parquet_set({path: df}, meta)


def write_parquet_set(frames: dict[str | Path, pd.DataFrame], meta: dict[str, str]) -> None:
    """Write a stage's parquet outputs together: all or none replaced, one run token."""
    meta = {**meta, RUN_TOKEN: uuid.uuid4().hex}
    tables = {Path(p): _table(Path(p), df, meta) for p, df in frames.items()}
    with atomic_paths(list(tables)) as tmps:
        for tmp, table in zip(tmps, tables.values(), strict=True):
            pq.write_table(table, tmp)


def check_same_run(paths: list[str | Path]) -> None:
    """The outputs of one stage must come from one run (see write_parquet_set)."""
    tokens = {Path(p): read_meta(p).get(RUN_TOKEN) for p in paths}
    if len(set(tokens.values())) > 1:
        names = ", ".join(p.name for p in tokens)
        stage = _stage_of(Path(paths[0]).name)
        raise ArtifactError(
            f"{', '.join(str(p) for p in tokens)} come from different runs of '{stage}' "
            f"({names} must be written together); rerun the '{stage}' stage"
        )


def _table(path: Path, df: pd.DataFrame, meta: dict[str, str]) -> pa.Table:
    name = path.name
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
    return table.replace_schema_metadata(full)


def read_meta(path: str | Path) -> dict[str, str]:
    return _decode_meta(pq.read_schema(path).metadata)


def _decode_meta(raw: dict[bytes, bytes] | None) -> dict[str, str]:
    raw = raw or {}
    return {
        k.decode().removeprefix("head_explain."): v.decode()
        for k, v in raw.items()
        if k.startswith(b"head_explain.")
    }


def _kind_ok(kind: str, typ: pa.DataType) -> bool:
    if kind == "int":
        return pa.types.is_integer(typ)
    if kind == "float":
        return pa.types.is_floating(typ) or pa.types.is_integer(typ) or pa.types.is_null(typ)
    if kind == "str":
        return pa.types.is_string(typ) or pa.types.is_large_string(typ)
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def check_parquet(
    path: str | Path, expect: dict[str, str] | None = None, full: bool = False
) -> dict[str, str]:
    """Check an artifact against its contract without loading it; returns its metadata.

    Existence, readable footer, schema version, `expect` (model, config_hash, ...),
    contract columns and their kinds; `full` also decodes every page (a file whose
    footer is intact but whose data is damaged).
    """
    path = Path(path)
    name = path.name
    stage = _stage_of(name)
    if not path.exists():
        raise ArtifactError(f"{path} is missing; run the '{stage}' stage first")
    try:
        footer = pq.read_metadata(path)
        schema = footer.schema.to_arrow_schema()
        meta = _decode_meta(schema.metadata)
    except Exception as exc:  # corrupt or not parquet
        raise ArtifactError(
            f"{path} is not a readable parquet file ({_short(exc)}); rerun '{stage}'"
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
    if name in CONTRACTS:
        missing = [c for c in CONTRACTS[name][1] if c not in schema.names]
        if missing:
            raise ArtifactError(f"{path} lacks columns {missing}; rerun the '{stage}' stage")
        for col in CONTRACTS[name][1] if footer.num_rows else ():  # no rows: no wrong value
            kind = COLUMN_KINDS.get(col)
            typ = schema.field(col).type
            if kind and not _kind_ok(kind, typ):
                raise ArtifactError(
                    f"{path} column '{col}' has type {typ}, expected {kind}; "
                    f"rerun the '{stage}' stage"
                )
    if full:
        _load(path, None, stage)
    return meta


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def _load(path: Path, columns: list[str] | None, stage: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise ArtifactError(
            f"{path} is damaged ({_short(exc)}); rerun the '{stage}' stage"
        ) from None


def read_parquet(
    path: str | Path, expect: dict[str, str] | None = None, columns: list[str] | None = None
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read an artifact, checking that it exists, matches its contract and `expect`.

    `expect` maps metadata keys (model, config_hash, ...) to required values.
    """
    path = Path(path)
    meta = check_parquet(path, expect)
    return _load(path, columns, _stage_of(path.name)), meta


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, sort_keys=True, default=_json_default) + "\n" for r in rows)
    write_text(path, text)
