"""pytest plugin: a real OpenAI-compatible server (llama-cpp-python) for integration tests.

Register in conftest.py with `pytest_plugins = ["tests.llama_server"]`. The fixture
serves the bundled SmolLM2 GGUF; `--logits_all true` is what makes echo logprobs (prompt
scoring) work. It skips, with the reason, when the dev extra is not installed.

`LlamaServer` is the same start/stop as a plain class, for tests that kill the server
(and start it again on the same port) and for `benchmarks/bench_resume.py`.
`prepared_artifacts` is the once-per-session sample -> cache -> select output (4 heads,
tiny params) that explain-stage tests run against.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_MODEL = "smollm2-135m-instruct"  # the alias clients pass as `model`
STARTUP_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[1]

# The cheapest artifacts an explain stage can run on: 4 heads, 3 examples of 8 tokens.
PREP_ARGS = [
    "--params", str(REPO / "params.yaml"), "--windows", "40", "--max-heads", "4",
    "--topk", "10", "--candidates", "20", "--random-windows", "8", "--explain-examples", "3",
    "--score-top-examples", "1", "--score-random-examples", "1", "--excerpt-len", "8",
]  # fmt: skip


class ServerUnavailable(Exception):
    """The dev extra or the bundled GGUF is missing (a reason to skip, not a failure)."""


class ServerFailed(Exception):
    """The server exited or did not answer in time; the message ends with its log."""


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


def server_gguf() -> Path:
    """The bundled GGUF, or ServerUnavailable saying what is missing."""
    missing = [m for m in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context")
               if importlib.util.find_spec(m) is None]  # fmt: skip
    if missing:
        raise ServerUnavailable(
            f"llama-cpp-python[server] is not installed (missing {', '.join(missing)}); "
            "pip install 'llama-cpp-python[server]'"
        )
    from head_explain.errors import ConfigError
    from head_explain.models import bundled_gguf

    try:
        return bundled_gguf()
    except ConfigError as exc:
        raise ServerUnavailable(str(exc)) from None


class LlamaServer:
    """A llama.cpp server process on 127.0.0.1 serving the bundled model.

    `kill()` SIGKILLs it (the server going away mid-stage); `start()` again brings it
    back on the same port, so clients and cache keys (which hold the URL) are unchanged.
    `logits_all=False` processes prompts about twice as fast on 2 cores and answers the
    same, but refuses requests for logprobs (simulation needs the default).
    """

    def __init__(self, log_path: str | Path, port: int | None = None, logits_all: bool = True):
        self.gguf = server_gguf()
        self.port = port or _free_port()
        self.log_path = Path(log_path)
        self.logits_all = logits_all
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        """Start (or restart) the server and wait until it answers; its base URL."""
        if self.proc is not None and self.proc.poll() is None:
            return self.base_url
        cmd = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf),
            "--model_alias", SERVER_MODEL, "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", "2048", "--logits_all", "true" if self.logits_all else "false",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _answers(f"{self.base_url}/models"):
            if self.proc.poll() is not None:
                raise ServerFailed(f"llama.cpp server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(
                    f"llama.cpp server did not answer in {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}"
                )
            time.sleep(0.2)
        return self.base_url

    def kill(self) -> None:
        """SIGKILL: no shutdown, connections in flight are cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextlib.contextmanager
def _serve(log_path: Path, logits_all: bool = True) -> Iterator[LlamaServer]:
    try:
        server = LlamaServer(log_path, logits_all=logits_all)
    except ServerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
    except ServerFailed as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory) -> Iterator[str]:
    """Base URL ("http://127.0.0.1:PORT/v1") of a llama.cpp server with the bundled model."""
    with _serve(tmp_path_factory.mktemp("llama_server") / "server.log") as server:
        yield server.base_url


@pytest.fixture(scope="session")
def chat_llama_server(tmp_path_factory) -> Iterator[str]:
    """Like `llama_server`, without --logits_all: explain-stage prompts are processed about
    twice as fast; requests for logprobs (simulation, the echo probe) get HTTP 500."""
    log = tmp_path_factory.mktemp("chat_llama_server") / "server.log"
    with _serve(log, logits_all=False) as server:
        yield server.base_url


@pytest.fixture()
def killable_llama_server(tmp_path) -> Iterator[LlamaServer]:
    """A private chat-only server a test may kill and start again (same port)."""
    with _serve(tmp_path / "killable_server.log", logits_all=False) as server:
        yield server


# --- artifacts for explain-stage tests -----------------------------------------------
def prepare_artifacts(outdir: str | Path, timeout_s: float = 600) -> Path:
    """Run `head-explain --until select` with PREP_ARGS into `outdir` (bundled model,
    offline; 30-60 s on 2 cores); returns `outdir`."""
    outdir = Path(outdir)
    code = "import sys; from head_explain.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEAD_EXPLAIN_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *PREP_ARGS, "--outdir", str(outdir), "--until", "select"],
        env=env, capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    if proc.returncode != 0 or not (outdir / "events.parquet").exists():
        raise RuntimeError(
            f"preparing artifacts failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return outdir


def copy_artifacts(prepared: Path, outdir: str | Path) -> Path:
    """A fresh outdir holding what the explain stage reads (events and evidence)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(prepared) / "events.parquet", outdir / "events.parquet")
    shutil.copy2(Path(prepared) / "evidence.parquet", outdir / "evidence.parquet")
    return outdir


@pytest.fixture(scope="session")
def prepared_artifacts(tmp_path_factory) -> Path:
    """sample -> cache -> select with PREP_ARGS, made once per session; copy, don't write."""
    return prepare_artifacts(tmp_path_factory.mktemp("prepared") / "outputs")
