"""Helpers shared by test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def head_explain_command() -> list[str]:
    """The installed `head-explain` script of this interpreter's venv, else `python -c`."""
    script = Path(sys.executable).with_name("head-explain")
    if script.exists():
        return [str(script)]
    found = shutil.which("head-explain")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from head_explain.cli import main; sys.exit(main())"]
