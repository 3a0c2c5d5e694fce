"""Where MLflow runs go, checked before any work: the store URI (a SQLite file at the
DVC root by default), its preflight, the lock around a local store's first use, and
credential redaction for anything shown. Does not import mlflow (only tracking does).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else sqlite:///<DVC_ROOT or cwd>/mlflow.db (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    root = Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifact folder beside a local SQLite db or file store; None for servers."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if str(db) in ("", ":memory:"):
            return None
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None  # file stores keep artifacts inside; servers choose their own


def redact(value: str) -> str:
    """Strip credentials from URLs (https://user:key@host) and key-like query args.

    Config values are logged verbatim otherwise; a base URL is the one field where a
    user may paste a key, so it is scrubbed rather than trusted.
    """
    value = re.sub(r"(://)[^/@\s]*@", r"\1", value)
    return re.sub(
        r"(?i)([?&](?:api[_-]?key|key|token|secret|password|access_token)=)[^&#\s]*",
        r"\1***",
        value,
    )


DB_SCHEMES = ("postgresql", "mysql", "mssql")
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", *DB_SCHEMES)
REACH_TIMEOUT_S = 5.0


def _sqlite_path(uri: str) -> Path | None:
    rest = uri.removeprefix("sqlite:///")
    return None if rest in ("", ":memory:") or rest == uri else Path(rest)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a local SQLite store across processes.

    Two runs that both find no mlflow.db would both run MLflow's schema migration
    (alembic) and one dies; a file lock beside the db makes the second wait.
    """
    db = _sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    with FileLock(str(db) + ".lock", timeout=300):
        yield


def check_tracking(cfg: Any) -> None:
    """Preflight for the report stage: the MLflow store can be used; writes nothing.

    A supported scheme, a non-empty experiment name, a writable folder for a local
    store, an answering server for http(s). Database servers are only scheme-checked.
    """
    from head_explain.errors import ConfigError

    if not str(cfg.mlflow_experiment).strip():
        raise ConfigError("key 'mlflow_experiment': empty; give an MLflow experiment name")
    uri = tracking_uri()
    shown = redact(uri)
    where = (
        "MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        else "the default store"
    )
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"{where} '{shown}': scheme '{scheme}' is not supported; valid: "
            f"{', '.join(TRACKING_SCHEMES)} or a local folder"
        )
    if scheme in ("http", "https"):
        _check_server(uri, shown, where)
        return
    if scheme in DB_SCHEMES:
        return
    if scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is None:
            raise ConfigError(f"{where} '{shown}': give a file, sqlite:///path/to/mlflow.db")
        folder = db.parent
        target = db if db.exists() else folder
    else:
        target = folder = Path(uri.removeprefix("file://") if scheme else uri)
        while not target.exists() and target != target.parent:
            target = target.parent
    if not folder.is_dir() and scheme == "sqlite":
        raise ConfigError(f"{where} '{shown}': folder {folder} does not exist")
    if scheme != "sqlite" and not target.is_dir():
        raise ConfigError(f"{where} '{shown}': {target} is a file, not a folder for runs")
    if not os.access(target, os.W_OK):
        raise ConfigError(f"{where} '{shown}': {target} is not writable")


def _check_server(uri: str, shown: str, where: str) -> None:
    import httpx

    from head_explain.errors import ConfigError

    url = uri.rstrip("/") + "/health"
    try:
        resp = httpx.get(url, timeout=REACH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        why = redact(" ".join(f"{type(exc).__name__}: {exc}".split()))[:160]
        raise ConfigError(
            f"{where} '{shown}' does not answer within {REACH_TIMEOUT_S:g}s ({why}); start "
            "the MLflow server or unset MLFLOW_TRACKING_URI for the local mlflow.db"
        ) from None
    if resp.status_code >= 500:
        raise ConfigError(
            f"{where} '{shown}' answers HTTP {resp.status_code}; is it an MLflow server?"
        )
