"""On-disk, content-addressed cache of LLM responses.

Why: explaining and simulating hundreds of heads costs money and minutes; a rerun (a
crash, a changed downstream stage, a DVC experiment) must not pay again. The key is the
sha256 of a canonical JSON of everything that determines the answer, so a changed
prompt, model, endpoint or decoding setting is a miss, never a stale hit.

SQLite in WAL mode with one commit per insert: several processes (DVC stages, parallel
experiments) may write at once, and a process killed at any instant leaves at most its
last row unwritten, never a corrupt file. API keys are never part of a key or a value.

Unusable replies (a caller's validator rejected them) are remembered too, as verdicts.
When a call has spent its whole retry budget and its last try was a reply the validator
rejected (not a transport error), that reply is stored under the call's key with the
`unusable` column holding the reason. Why: at temperature 0 the endpoint gives the same
unusable reply again, so asking on every rerun would pay for a known bad answer each
time ("nothing is paid for twice"; a rerun with unchanged prompts makes no requests).
A later call with that key fails at once with the same reason, as a cache hit and a
failure, and sends nothing. A usable reply stored later for the key replaces the
verdict. Transport failures (429, 5xx, timeouts, resets) are never stored: a rerun asks
again. To ask again for a remembered unusable reply, delete the cache file (or use
another one) or set llm_cache=off.

Schema: responses(key, value, created, unusable); `unusable` is NULL for a usable reply.
A file written before the column existed gains it on open (its rows stay usable); code
that predates the column reads a verdict's value as a reply and re-validates it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from head_explain.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # bump when the stored value's layout changes: old rows become misses
DEFAULT_NAME = "llm_cache.sqlite"


def canonical_json(payload: Any) -> str:
    """Stable JSON: sorted keys, no whitespace, so equal payloads hash equally."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(payload: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of `payload` (plus the schema version)."""
    body = canonical_json({"schema": SCHEMA_VERSION, **payload})
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def default_path() -> Path:
    """~/.cache/head-explain/llm_cache.sqlite, or under $HEAD_EXPLAIN_CACHE."""
    from head_explain.bundled_models import cache_root

    return cache_root() / DEFAULT_NAME


def resolve_path(setting: str) -> Path | None:
    """cfg.llm_cache -> a file path; None when the cache is off."""
    setting = (setting or "").strip()
    if setting.lower() == "off":
        return None
    return Path(setting).expanduser() if setting else default_path()


@dataclass(frozen=True)
class CacheEntry:
    """One stored row: the reply's JSON and, for a remembered unusable reply, why."""

    value: dict[str, Any]
    unusable: str | None = None


class LLMCache:
    """A key -> JSON value store; safe for threads, processes and kills."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit, i.e. each INSERT is its own transaction.
            self._conn = sqlite3.connect(
                self.path, timeout=60, isolation_level=None, check_same_thread=False
            )
            self._retry(lambda: self._conn.execute("PRAGMA journal_mode=WAL"))
            # NORMAL is durable against a killed process in WAL mode (not a power cut).
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._retry(
                lambda: self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS responses ("
                    " key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL,"
                    " unusable TEXT)"
                )
            )
            self._migrate()
        except (sqlite3.DatabaseError, OSError) as exc:
            raise ConfigError(
                f"key 'llm_cache': cannot use '{self.path}' as an SQLite cache ({exc}); "
                "give another file, delete this one, or set llm_cache=off"
            ) from None

    def _migrate(self) -> None:
        """Add the `unusable` column to a file made before it existed (rows stay usable)."""
        cols = {r[1] for r in self._conn.execute("PRAGMA table_info(responses)").fetchall()}
        if "unusable" in cols:
            return
        try:
            self._retry(
                lambda: self._conn.execute("ALTER TABLE responses ADD COLUMN unusable TEXT")
            )
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):  # another process added it first
                raise

    @staticmethod
    def _retry(fn, attempts: int = 20):
        """Run `fn`, retrying while another process holds the write lock."""
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                transient = "locked" in str(exc) or "busy" in str(exc)
                if not transient or i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
        return None

    def entry(self, key: str) -> CacheEntry | None:
        """The row under `key`, usable or a remembered unusable reply; None if absent."""
        with self._lock:
            row = self._retry(
                lambda: self._conn.execute(
                    "SELECT value, unusable FROM responses WHERE key = ?", (key,)
                ).fetchone()
            )
        if row is None:
            return None
        try:
            value = json.loads(row[0])
        except ValueError:  # cannot happen with our writes; treat as a miss
            log.warning("llm cache row %s is not JSON; ignoring it", key[:12])
            return None
        return CacheEntry(value, row[1])

    def get(self, key: str) -> dict[str, Any] | None:
        """The usable value under `key`; None if absent or remembered as unusable."""
        hit = self.entry(key)
        return None if hit is None or hit.unusable is not None else hit.value

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store a usable reply (replacing whatever the key held, a verdict included)."""
        self._put(key, value, None)

    def put_unusable(self, key: str, value: dict[str, Any], reason: str) -> None:
        """Remember `value` as the definitive unusable reply for `key`, and why."""
        self._put(key, value, reason or "unusable")

    def _put(self, key: str, value: dict[str, Any], unusable: str | None) -> None:
        text = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._retry(
                lambda: self._conn.execute(
                    "INSERT OR REPLACE INTO responses (key, value, created, unusable)"
                    " VALUES (?, ?, ?, ?)",
                    (key, text, time.time(), unusable),
                )
            )

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def unusable_count(self) -> int:
        """How many rows are remembered unusable replies."""
        with self._lock:
            return self._conn.execute(
                "SELECT COUNT(*) FROM responses WHERE unusable IS NOT NULL"
            ).fetchone()[0]

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):  # closing twice is harmless
            self._conn.close()


def open_cache(setting: str) -> LLMCache | None:
    """The cache named by cfg.llm_cache, or None when it is 'off'."""
    path = resolve_path(setting)
    if path is None:
        return None
    if path.exists() and path.is_dir():
        raise ConfigError(f"key 'llm_cache': '{path}' is a folder; give a file path or 'off'")
    log.debug("llm cache at %s (pid %d)", path, os.getpid())
    return LLMCache(path)
