"""Build the browser's files (pure) and put them in `outdir/browser/` (atomically).

`build_browser(inputs)` maps artifacts to {relative path: page text} and touches no
file; `write_browser` writes them into a temp folder beside the target and swaps it in,
so a reader never sees half a browser; `render_to(outdir)` adds the two things that
need models (attention rows of one excerpt per head, explanation embeddings for the
nearest heads), each optional: where one cannot be computed the page says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from head_explain.browser.data import explanations_by_head, head_data, index_data, lookups
from head_explain.browser.inputs import load_inputs, model_name
from head_explain.browser.page import render_page
from head_explain.heads import head_name

log = logging.getLogger(__name__)

BROWSER_DIR = "browser"


def _pages(inputs: dict[str, Any]) -> set[str]:
    """Heads that get a page of their own: those with events, explanations or scores."""
    names: set[str] = set()
    for key in ("events", "scores"):
        df = inputs.get(key)
        if df is not None and len(df):
            pairs = df[["layer", "head"]].drop_duplicates().itertuples(index=False)
            names |= {head_name(int(a), int(b)) for a, b in pairs}
    names |= {head_name(*k) for k in explanations_by_head(inputs.get("explanations"))}
    return names


def build_browser(inputs: dict[str, Any]) -> dict[str, str]:
    """{relative path: HTML} for index.html and heads/<name>.html."""
    pages = _pages(inputs)
    index = index_data(inputs, pages)
    model = index["model"] or "model"
    files = {"index.html": render_page(f"Heads of {model}", "index", index)}
    look = lookups(inputs)
    for entry in index["heads"]:
        if entry["name"] in pages:
            data = head_data(inputs, entry, index, look)
            files[f"heads/{entry['name']}.html"] = render_page(
                f"{entry['name']} · {model}", "head", data
            )
    # A head outside the grid (a foreign artifact) has no cell; say so, do not drop it.
    missing = pages - {h["name"] for h in index["heads"]}
    if missing:
        log.warning("browser: %d head(s) lie outside the model grid: %s", len(missing), missing)
    return files


def write_browser(outdir: str | Path, files: dict[str, str | bytes]) -> Path:
    """Write `files` to outdir/browser/ via a temp folder that is swapped in."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    target = outdir / BROWSER_DIR
    tmp = Path(tempfile.mkdtemp(dir=outdir, prefix=f".{BROWSER_DIR}."))
    try:
        for rel, content in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if target.exists():
            old = outdir / f".{BROWSER_DIR}.old.{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _patterns(inputs: dict[str, Any], model: str, device: str, dtype: str):
    from head_explain.browser.patterns import excerpt_patterns
    from head_explain.models import load_bridge

    bridge, _ = load_bridge(model, device, dtype)
    return excerpt_patterns(bridge, inputs["windows"], inputs["events"])


def _embeddings(inputs: dict[str, Any], embedding_model: str) -> dict[str, np.ndarray]:
    from head_explain.cluster import embed

    rows = explanations_by_head(inputs.get("explanations"))
    texts = {
        head_name(*k): str(v[-1].get("explanation") or "")
        for k, v in rows.items()
        if v and not v[-1].get("error")
    }
    texts = {k: t for k, t in texts.items() if t.strip()}
    if len(texts) < 2:
        return {}
    vecs = embed(list(texts.values()), embedding_model)
    return dict(zip(texts, vecs, strict=True))


def render_to(
    outdir: str | Path,
    *,
    model: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    embedding_model: str = "all-MiniLM-L6-v2",
    patterns: bool = True,
    neighbours: bool = True,
) -> dict[str, Any]:
    """Read outdir's artifacts, build the browser, write outdir/browser/; return metrics."""
    t0 = time.time()
    inputs = load_inputs(outdir)
    notes = {}
    model = model or model_name(inputs)
    have_events = inputs.get("events") is not None and inputs.get("windows") is not None
    if patterns and inputs.get("patterns") is None and have_events and model:
        try:
            inputs["patterns"] = _patterns(inputs, model, device, dtype)
        except Exception as exc:  # a view extra: the pages say the pattern is absent
            notes["patterns"] = f"{type(exc).__name__}: {exc}"[:200]
            log.warning("browser: no attention patterns (%s)", notes["patterns"])
    if neighbours and inputs.get("explanations"):
        try:
            inputs["embeddings"] = _embeddings(inputs, embedding_model)
        except Exception as exc:
            notes["neighbours"] = f"{type(exc).__name__}: {exc}"[:200]
            log.warning("browser: no nearest heads (%s)", notes["neighbours"])
    t1 = time.time()
    files = build_browser(inputs)
    target = write_browser(outdir, files)
    size = sum(len(c.encode() if isinstance(c, str) else c) for c in files.values())
    metrics = {
        "browser_files": len(files),
        "browser_head_pages": len(files) - 1,
        "browser_bytes": size,
        "browser_seconds": round(time.time() - t0, 2),
        "browser_build_seconds": round(time.time() - t1, 2),
        **{f"browser_note_{k}": v for k, v in notes.items()},
    }
    log.info(
        "browser: %d files, %.2f MB in %s (%.1fs)",
        len(files), size / 1e6, target / "index.html", metrics["browser_seconds"],
    )  # fmt: skip
    return metrics
