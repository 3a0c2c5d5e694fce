"""pytest plugin: a real OpenAI-compatible server (llama-cpp-python) for integration tests.

Register in conftest.py with `pytest_plugins = ["tests.llama_server"]`. The fixture
serves the bundled SmolLM2 GGUF; `--logits_all true` is what makes echo logprobs (prompt
scoring) work. It skips, with the reason, when the dev extra is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

SERVER_MODEL = "smollm2-135m-instruct"  # the alias clients pass as `model`
STARTUP_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """Base URL ("http://127.0.0.1:PORT/v1") of a llama.cpp server with the bundled model."""
    missing = [m for m in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context")
               if importlib.util.find_spec(m) is None]  # fmt: skip
    if missing:
        pytest.skip(
            f"llama-cpp-python[server] is not installed (missing {', '.join(missing)}); "
            "pip install 'llama-cpp-python[server]'"
        )
    from head_explain.errors import ConfigError
    from head_explain.models import bundled_gguf

    try:
        gguf = bundled_gguf()
    except ConfigError as exc:
        pytest.skip(str(exc))
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
        "--model_alias", SERVER_MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--logits_all", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers(f"{base}/models"):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"llama.cpp server exited with {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"llama.cpp server did not answer in {STARTUP_TIMEOUT_S}s:\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
