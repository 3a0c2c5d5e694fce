"""Logging set-up shared by the CLI and the DVC stage entries."""

from __future__ import annotations

import logging
import warnings

# Libraries stay at WARNING unless asked; their deprecation chatter is not ours.
_QUIET = ("transformers", "transformer_lens", "httpx", "urllib3", "mlflow", "alembic",
          "sentence_transformers", "datasets", "filelock", "huggingface_hub")  # fmt: skip


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("head_explain").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        warnings.filterwarnings("ignore")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:  # transformers missing: nothing to quieten
            pass
