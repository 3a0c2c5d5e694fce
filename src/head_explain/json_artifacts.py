"""JSON and JSONL artifacts read against their contracts, and the resumable journal.

Every row of explanations.jsonl must be an object with typed fields; clusters.json an
object with its lists. Undecodable bytes, bad JSON and a contract breach are each an
ArtifactError naming the file and the stage to rerun, never a crash further on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from head_explain.errors import ArtifactError

# JSONL artifacts: file name -> (stage, {field: allowed python types}).
JSONL_CONTRACTS: dict[str, tuple[str, dict[str, tuple[type, ...]]]] = {
    "explanations.jsonl": (
        "explain",
        {"layer": (int,), "head": (int,), "explanation": (str,), "error": (str, type(None))},
    ),
}
# JSON artifacts: file name -> (stage, {key: required python type}).
JSON_CONTRACTS: dict[str, tuple[str, dict[str, type]]] = {
    "clusters.json": ("cluster", {"clusters": list, "noise": list, "failed": list}),
}


def _stage_of(name: str) -> str:
    for table in (JSONL_CONTRACTS, JSON_CONTRACTS):
        if name in table:
            return table[name][0]
    return "an earlier stage"


def _json_kind(obj: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(obj), "number")


def _check_row(path: Path, lineno: int, row: Any) -> None:
    name = path.name
    if name not in JSONL_CONTRACTS:
        if not isinstance(row, dict):
            raise ArtifactError(f"{path}:{lineno} is not a JSON object; rerun the stage")
        return
    stage, fields = JSONL_CONTRACTS[name]
    if not isinstance(row, dict):
        raise ArtifactError(
            f"{path}:{lineno} is a JSON {_json_kind(row)}, not an object; rerun the '{stage}' stage"
        )
    for key, types in fields.items():
        value = row.get(key)
        if key not in row or isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ArtifactError(
                f"{path}:{lineno} field '{key}' is {value!r}, expected {want}; "
                f"rerun the '{stage}' stage"
            )


def _parse_line(path: Path, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise ArtifactError(
            f"{path}:{lineno} is not valid JSON; rerun the '{_stage_of(path.name)}' stage"
        ) from None


def _read_utf8(path: Path) -> str:
    stage = _stage_of(path.name)
    if not path.exists():
        raise ArtifactError(f"{path} is missing; run the '{stage}' stage first")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(
            f"{path} is not UTF-8 text (byte {exc.start}); rerun the '{stage}' stage"
        ) from None
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({exc.strerror})") from None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a JSONL artifact; each must be an object meeting its contract.

    A contracted artifact with no rows is refused too: its stage always writes some.
    """
    path = Path(path)
    rows = []
    for i, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        row = _parse_line(path, i, line)
        _check_row(path, i, row)
        rows.append(row)
    if not rows and path.name in JSONL_CONTRACTS:
        raise ArtifactError(
            f"{path} holds no rows; rerun the '{JSONL_CONTRACTS[path.name][0]}' stage"
        )
    return rows


def read_partial_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of an append-only journal (a resumable stage's progress); (rows, dropped).

    A crash or a full disk can cut off the last line: that line is dropped (the work
    it recorded is redone) and counted. Damage before the last line is no crash
    pattern: an ArtifactError that names the file to delete.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop() if lines else b""  # text after the last newline: an unfinished append
    rows: list[dict[str, Any]] = []
    dropped = 1 if torn.strip() else 0
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            _check_row(Path(path.name.removeprefix(".").removesuffix(".partial")), i, row)
        except (ValueError, RecursionError, ArtifactError):
            if i == len(lines) and not torn.strip():  # the last line, newline written
                dropped += 1
                continue
            raise ArtifactError(
                f"{path} is damaged at line {i} (not the last line, so not an interrupted "
                f"write); delete {path} and rerun (finished heads come from the LLM cache)"
            ) from None
        rows.append(row)
    return rows, dropped


def read_json(path: str | Path) -> Any:
    """A JSON artifact, checked against its contract (JSON_CONTRACTS)."""
    path = Path(path)
    stage = _stage_of(path.name)
    try:
        obj = json.loads(_read_utf8(path))
    except (json.JSONDecodeError, RecursionError):
        raise ArtifactError(f"{path} is not valid JSON; rerun the '{stage}' stage") from None
    if path.name in JSON_CONTRACTS:
        fields = JSON_CONTRACTS[path.name][1]
        if not isinstance(obj, dict):
            raise ArtifactError(
                f"{path} is a JSON {_json_kind(obj)}, expected an object with keys "
                f"{', '.join(fields)}; rerun the '{stage}' stage"
            )
        for key, typ in fields.items():
            if not isinstance(obj.get(key), typ):
                raise ArtifactError(
                    f"{path} key '{key}' is {obj.get(key)!r}, expected a {typ.__name__}; "
                    f"rerun the '{stage}' stage"
                )
    return obj
