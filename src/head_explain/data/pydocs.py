"""The embedded corpus: English prose that ships with every CPython.

It needs no download, so the pipeline and its tests run offline on any machine:
the `pydoc_data` help topics (the language reference, as `help()` shows it) plus
the docstrings of the standard library, read with `ast` from the source files -
never imported, since importing the stdlib wholesale has side effects (GUI
toolkits, `this`, `antigravity`).
"""

from __future__ import annotations

import ast
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from head_explain.data import Document

log = logging.getLogger(__name__)

SOURCE = "pydocs"
MIN_DOCSTRING_CHARS = 200  # shorter ones are mostly "Return x." one-liners
# Tests, IDLE, vendored packages and demos: code-heavy, duplicated or not stdlib proper.
SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "ensurepip",
     "__pycache__", "dist-packages", "config-3"}
)  # fmt: skip


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_topics() -> Iterator[Document]:
    """One document per `help()` topic, in name order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; docstrings still work
        log.warning("pydoc_data is not installed; pydocs uses docstrings only")
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield Document(SOURCE, f"topic/{name}", text)


def module_files(root: Path) -> list[tuple[str, Path]]:
    """(dotted module name, path) of the stdlib sources worth reading, sorted by name."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")
        )
        rel = Path(dirpath).relative_to(root)
        for fn in filenames:
            if not fn.endswith(".py"):
                continue
            parts = list(rel.parts)
            if fn != "__init__.py":
                parts.append(fn[:-3])
            if not parts or any(not p.isidentifier() for p in parts):
                continue  # e.g. a stray script with a dash in its name
            found.append((".".join(parts), Path(dirpath) / fn))
    return sorted(found)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Module, class and function docstrings in source order (depth first)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                yield doc
        children = [
            c
            for c in ast.iter_child_nodes(node)
            if isinstance(c, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef | ast.If)
        ]
        stack.extend(reversed(children))


def module_text(path: Path) -> str:
    """The long docstrings of one module joined by blank lines ('' when none)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError) as exc:  # unreadable: skip, it is not prose
        log.debug("pydocs: skipping %s (%s)", path, exc)
        return ""
    return "\n\n".join(_docstrings(tree))


def iter_modules(root: Path | None = None) -> Iterator[Document]:
    """One document per stdlib module that has long docstrings, in module-name order."""
    root = root or stdlib_dir()
    for name, path in module_files(root):
        text = module_text(path)
        if text:
            yield Document(SOURCE, f"module/{name}", text)


def iter_pydocs() -> Iterator[Document]:
    """The whole embedded corpus: help topics, then module docstrings."""
    yield from iter_topics()
    yield from iter_modules()
