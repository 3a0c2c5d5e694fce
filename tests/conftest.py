"""Shared fixtures. Tests never reach the network: the hub is forced offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = ["llama_server"]  # the real llama.cpp server fixture (tests/llama_server.py)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real third-party corpora live there)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The bundled SmolLM2 tokenizer (offline)."""
    from head_explain.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_bridge():
    """The bundled SmolLM2 as a TransformerBridge on CPU (loads in a few seconds)."""
    from head_explain.models import load_bridge

    bridge, tok = load_bridge("smollm2-135m-instruct", "cpu", "float32")
    return bridge


TINY_ARGS = [
    "--model", "smollm2-135m-instruct", "--sources", "pydocs", "--windows", "40",
    "--window-len", "32", "--heads", "L17H5,L8H7", "--topk", "8", "--candidates", "16",
    "--random-windows", "6", "--explain-examples", "3", "--score-top-examples", "1",
    "--score-random-examples", "1", "--excerpt-len", "8", "--max-events-per-window", "2",
    "--min-cluster-size", "2",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory) -> Path:
    """sample -> cache -> select on the bundled model with tiny params, made once."""
    from head_explain.cli import main

    out = tmp_path_factory.mktemp("tiny") / "outputs"
    assert main([*TINY_ARGS, "--outdir", str(out), "--until", "select"]) == 0
    return out
