"""HTML assembly: one self-contained page = inline CSS + inline JS + embedded JSON data.

Untrusted strings (corpus tokens, LLM explanations) only ever travel inside the JSON
data block and are rendered by the page's script with `textContent`, never parsed as
HTML. The JSON is made safe to sit inside `<script type="application/json">`: `<`, `>`
and `&` become `\\u003c`-style escapes (so `</script>` or `<!--` in a token cannot close
or comment out the block) and U+2028/U+2029 are escaped (old JS parsers treat them as
newlines). A Content-Security-Policy admits only the page's own script, by hash, so an
element injected by some future bug could still not run code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any

import pandas as pd

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def clean(obj: Any, digits: int = 4) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy -> Python, floats rounded to `digits`."""
    if isinstance(obj, dict):
        return {str(k): clean(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v, digits) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return clean(obj.tolist(), digits)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else None
    if obj is pd.NA or obj is pd.NaT:
        return None
    if hasattr(obj, "item"):
        return clean(obj.item(), digits)
    return str(obj)


def script_json(data: Any) -> str:
    """JSON text that is inert inside a <script type="application/json"> element."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in _JSON_ESCAPES.items():
        text = text.replace(ch, esc)
    return text


@lru_cache(maxsize=8)
def asset(name: str) -> str:
    """A file of the packaged assets folder (CSS/JS shipped as package data)."""
    return resources.files("head_explain.browser").joinpath("assets", name).read_text("utf-8")


def _csp(scripts: list[str]) -> str:
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    )
    # No network at all: no connect/img/font sources beyond data: URIs.
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )


def _text(s: str) -> str:
    """Escape our own (trusted, short) strings for the title element."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_page(title: str, kind: str, data: Any) -> str:
    """A complete HTML page: `kind` is 'index' or 'head' (selects the JS entry)."""
    script = asset("common.js") + "\n" + asset(f"{kind}.js")
    body = (
        '<header id="top"></header><main id="app"><noscript>This browser needs '
        "JavaScript (no network access is used).</noscript></main>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_csp([script])}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(title)}</title><style>{asset('browser.css')}</style></head>"
        f'<body data-kind="{kind}">{body}'
        f'<script type="application/json" id="data">{script_json(clean(data))}</script>'
        f"<script>{script}</script></body></html>\n"
    )
