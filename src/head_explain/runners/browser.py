"""Stage 'browser': every artifact that exists -> outdir/browser/ (index.html + heads/).

The browser is a view: a missing optional artifact leaves its part out, and the two
extras that need models (attention rows of one excerpt per head from the subject model,
explanation embeddings for nearest heads) are skipped with a note in the metrics when
they cannot be computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from head_explain.browser import render_to
from head_explain.config import Config

STAGE = "browser"


def preflight(cfg: Config) -> None:
    """Nothing beyond the config schema: every input of the browser is optional."""


def run(cfg: Config) -> dict[str, Any]:
    metrics = render_to(
        Path(cfg.outdir),
        model=cfg.model,
        device=cfg.device,
        dtype=cfg.dtype,
        embedding_model=cfg.embedding_model,
    )
    metrics["browser_index"] = str(Path(cfg.outdir) / "browser" / "index.html")
    return metrics
