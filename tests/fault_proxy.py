"""A fault-injecting HTTP proxy on loopback, and a harness that runs the explain stage.

`FaultProxy(upstream)` forwards to a real server (the llama.cpp fixture) and answers each
POST according to a programmable plan: `proxy.plan(f1, f2, ..., then=PASS)` gives the
next POSTs f1, f2, ... in arrival order and every later one `then`. GETs (the readiness
check's /models) always pass. Faults:

- `status(code, retry_after=...)`: answer with that status, never reaching the server;
- `RESET`: read the request, then drop the connection with a TCP RST;
- `hang(s)`: read the request, send nothing for `s` seconds, close (the client times out);
- `TRUNCATE`: the server's real reply, connection closed halfway through the body;
- `CUT_JSON`: the real reply cut in half, Content-Length to match (invalid JSON);
- `NOT_JSON`: 200 with an HTML body;
- `mutate(fn)`: the real reply with its JSON changed by `fn` (unusable content);
- `HOLD`: wait until `release()` (or the client goes away), then pass;
- `slow(s)`: a busy server: wait `s` seconds, then pass, whether the client waited or not.

`down()` stops listening (connections are refused, as when the server is gone) and
`up()` listens again on the same port. Every request is recorded in `proxy.records`.

The harness (`ExplainRun`, `SimulateRun`) writes a params file, runs one stage as a
subprocess (the DVC entry point `stage_main`), and reads back its metrics and outputs;
the kill-and-resume scenarios (`kill_and_resume` for explain, `kill_and_resume_simulate`
for simulate) live here so that tests/test_resume.py and benchmarks/bench_resume.py run
the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# --- faults ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: (
        str  # pass | status | reset | hang | slow | truncate | cut_json | not_json | mutate | hold
    )
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    seconds: float = 0.0
    fn: Callable[[dict], None] | None = None
    label: str = ""

    def __str__(self) -> str:
        return self.label or (f"{self.kind} {self.status}" if self.status else self.kind)


PASS = Fault("pass")
RESET = Fault("reset")
TRUNCATE = Fault("truncate")
CUT_JSON = Fault("cut_json")
NOT_JSON = Fault("not_json")
HOLD = Fault("hold")


def status(code: int, retry_after: str | None = None, message: str = "injected") -> Fault:
    headers = [("content-type", "application/json")]
    if retry_after is not None:
        headers.append(("retry-after", retry_after))
    body = json.dumps({"error": {"message": f"{message} {code}", "type": "server_error"}})
    label = f"status {code}" + (f" retry-after {retry_after}" if retry_after else "")
    return Fault("status", code, tuple(headers), body.encode(), label=label)


def hang(seconds: float) -> Fault:
    return Fault("hang", seconds=seconds, label=f"hang {seconds}s")


def slow(seconds: float) -> Fault:
    return Fault("slow", seconds=seconds, label=f"slow {seconds}s")


def mutate(fn: Callable[[dict], None], label: str = "mutate") -> Fault:
    return Fault("mutate", fn=fn, label=label)


# Content mutations of a real reply (all leave a well-formed, 200, JSON response).
def chat_content(text: str) -> Callable[[dict], None]:
    """Replace a chat reply's text, dropping its logprobs (so only the text counts)."""

    def fn(body: dict) -> None:
        body["choices"][0]["message"]["content"] = text
        body["choices"][0]["logprobs"] = None

    return fn


def echo_tops(top: dict[str, float]) -> Callable[[dict], None]:
    """Replace every prompt token's top alternatives in an echo reply."""

    def fn(body: dict) -> None:
        lp = body["choices"][0]["logprobs"]
        lp["top_logprobs"] = [dict(top) if t else t for t in lp["top_logprobs"]]

    return fn


# --- the proxy ---------------------------------------------------------------------------
@dataclass
class Record:
    method: str
    path: str
    fault: str
    t: float = field(default_factory=time.monotonic)
    outcome: str = ""  # answered | reset | hung | dropped | upstream error
    body: bytes = b""  # the request body as sent

    def json(self) -> dict:
        return json.loads(self.body or b"{}")


HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
       "host", "accept-encoding", "upgrade", "proxy-connection"}  # fmt: skip


class FaultProxy:
    """See the module docstring. Runs its own event loop in a daemon thread."""

    def __init__(self, upstream: str, port: int = 0, latency_s: float = 0.0):
        # upstream: "http://127.0.0.1:PORT" or a base URL ending in /v1 (kept as is: the
        # proxy forwards paths unchanged).
        self.upstream = upstream.rstrip("/").removesuffix("/v1")
        self.port = port
        self.latency_s = latency_s  # added to every POST, like a remote API's round trip
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._plan: deque[Fault] = deque()
        self._then: Fault = PASS
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._release: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self.held = 0  # requests waiting on HOLD right now
        self._client: Any = None

    # --- control (any thread) ------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultProxy:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._up())
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def plan(self, *faults: Fault, then: Fault = PASS) -> None:
        """The next POSTs get `faults` in order, every later one `then`; a new plan also
        closes the HOLD gate again."""
        with self._lock:
            self._plan = deque(faults)
            self._then = then
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._new_gate(), self._loop).result(10)

    def release(self) -> None:
        """Let held requests (and later HOLDs) through."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._gate().set)

    def down(self) -> None:
        """Stop listening: new connections are refused."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._down(), self._loop).result(10)

    def up(self) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._up(), self._loop).result(10)

    def posts(self, path_part: str = "") -> list[Record]:
        return [r for r in list(self.records) if r.method == "POST" and path_part in r.path]

    def reset_records(self) -> None:
        self.records = []

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop ----------------------------------------------------------------------
    def _gate(self) -> asyncio.Event:
        if self._release is None:
            self._release = asyncio.Event()
        return self._release

    async def _new_gate(self) -> None:
        self._release = asyncio.Event()

    async def _up(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _shutdown(self) -> None:
        await self._down()
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()

    def _next_fault(self, method: str) -> Fault:
        if method != "POST":
            return PASS
        with self._lock:
            return self._plan.popleft() if self._plan else self._then

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers.append((k.strip(), v.strip()))
        length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
        body = await reader.readexactly(length) if length else b""
        fault = self._next_fault(method)
        rec = Record(method, path, str(fault), body=body)
        self.records.append(rec)
        if self.latency_s and method == "POST":
            await asyncio.sleep(self.latency_s)

        if fault.kind == "status":
            rec.outcome = "answered"
            await self._respond(writer, fault.status, list(fault.headers), fault.body)
            return
        if fault.kind == "reset":
            rec.outcome = "reset"
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if fault.kind == "hang":
            rec.outcome = "hung"
            with contextlib.suppress(asyncio.TimeoutError):  # or the client goes away
                await asyncio.wait_for(reader.read(1), fault.seconds)
            return
        if fault.kind == "not_json":
            rec.outcome = "answered"
            page = b"<html><body><h1>502 Bad Gateway</h1>upstream hiccup</body></html>"
            await self._respond(writer, 200, [("content-type", "text/html")], page)
            return
        if fault.kind == "slow":  # the server works on, even for a client that gave up
            await asyncio.sleep(fault.seconds)
        if fault.kind == "hold":
            self.held += 1
            gate = asyncio.ensure_future(self._gate().wait())
            gone = asyncio.ensure_future(reader.read(1))  # b"" once the client has gone
            try:
                done, _ = await asyncio.wait({gate, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.held -= 1
                gate.cancel()
                gone.cancel()
            if gate not in done:
                rec.outcome = "dropped"  # the client died while held: never forwarded
                return

        status_code, up_headers, up_body = await self._forward(method, path, headers, body)
        if status_code == 0:
            rec.outcome = "upstream error"
            await self._respond(writer, 502, [("content-type", "text/plain")], up_body)
            return
        rec.outcome = "answered"
        if fault.kind == "mutate" and fault.fn is not None:
            try:
                data = json.loads(up_body)
                fault.fn(data)
                up_body = json.dumps(data).encode()
            except (ValueError, KeyError, IndexError, TypeError):  # not a reply to mutate
                rec.outcome = f"answered {status_code} unmutated"
        if fault.kind == "cut_json":
            up_body = up_body[: len(up_body) // 2]
        if fault.kind == "truncate":
            head_bytes = self._head(status_code, up_headers, len(up_body))
            writer.write(head_bytes + up_body[: len(up_body) // 2])
            await writer.drain()
            writer.close()  # flushes, then FIN: the client reads a short body
            await writer.wait_closed()
            return
        await self._respond(writer, status_code, up_headers, up_body)

    async def _forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=600)
        fwd = [(k, v) for k, v in headers if k.lower() not in HOP]
        try:
            resp = await self._client.request(
                method, self.upstream + path, headers=fwd, content=body
            )
        except httpx.HTTPError as exc:
            return 0, [], f"upstream: {type(exc).__name__}".encode()
        out = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP]
        return resp.status_code, out, resp.content

    @staticmethod
    def _head(code: int, headers: list[tuple[str, str]], length: int) -> bytes:
        lines = [f"HTTP/1.1 {code} X"] + [f"{k}: {v}" for k, v in headers]
        lines += [f"content-length: {length}", "connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _respond(
        self, writer: asyncio.StreamWriter, code: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        writer.write(self._head(code, headers, len(body)) + body)
        await writer.drain()


# --- the stage harness -------------------------------------------------------------------
def stage_code(stage: str) -> str:
    """`python -c` code running one stage as DVC does (params file in argv[1])."""
    return (
        "import sys; from head_explain.stage_entry import stage_main; "
        f"from head_explain.runners import {stage}; stage_main({stage}, sys.argv[1])"
    )


STAGE_CODE = stage_code("explain")


@dataclass
class StageResult:
    returncode: int
    stderr: str
    seconds: float


class StageRun:
    """One outdir + params file for one LLM stage against an OpenAI-compatible URL."""

    stage = "explain"

    def __init__(self, outdir: Path, base_url: str, cache: Path, **overrides: Any):
        from llama_server import PREP_ARGS, REPO, SERVER_MODEL

        self.outdir = Path(outdir)
        self.cache = Path(cache)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        flags = PREP_ARGS[2:]  # the prepared artifacts' params (after --params FILE)
        for flag, value in zip(flags[::2], flags[1::2], strict=True):
            params[flag.removeprefix("--").replace("-", "_")] = yaml.safe_load(value)
        params.update(
            llm="openai", openai_base_url=base_url, openai_model=SERVER_MODEL,
            llm_cache=str(self.cache), llm_concurrency=1, llm_timeout_s=60.0,
            llm_max_retries=2, outdir=str(self.outdir),
        )  # fmt: skip
        params.update(overrides)
        self.params = self.outdir / "params.yaml"
        self.params.write_text(yaml.safe_dump(params, sort_keys=True))
        self.proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HEAD_EXPLAIN_PROGRESS": "0"}
        env.pop("OPENAI_BASE_URL", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", stage_code(self.stage), str(self.params)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        return self.proc

    def run(self, timeout_s: float = 240) -> StageResult:
        t0 = time.monotonic()
        proc = self.start()
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(
                f"{self.stage} stage ran past {timeout_s}s:\n{err[-3000:]}"
            ) from None
        return StageResult(proc.returncode, err, time.monotonic() - t0)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate()

    # --- what it left --------------------------------------------------------------
    def metrics(self) -> dict:
        return json.loads((self.outdir / "metrics" / f"{self.stage}.json").read_text())

    def cache_rows(self, unusable: bool | None = None) -> int:
        """Rows in the LLM cache (only those marked unusable, or only usable ones)."""
        if not self.cache.exists():
            return 0
        where = {None: "", True: " WHERE unusable IS NOT NULL", False: " WHERE unusable IS NULL"}
        with contextlib.closing(sqlite3.connect(self.cache)) as conn:
            # The stage makes the file before its table: polled in between, it holds no rows.
            made = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='responses'"
            if conn.execute(made).fetchone() is None:
                return 0
            return conn.execute(f"SELECT COUNT(*) FROM responses{where[unusable]}").fetchone()[0]


class ExplainRun(StageRun):
    """The explain stage; it keeps finished heads in a partial file while it runs."""

    stage = "explain"

    @property
    def partial(self) -> Path:
        return self.outdir / ".explanations.jsonl.partial"

    def partial_rows(self) -> list[dict]:
        if not self.partial.exists():
            return []
        rows = []
        for line in self.partial.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line cut by the kill
                rows.append(json.loads(line))
        return rows

    def rows(self) -> list[dict]:
        path = self.outdir / "explanations.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def explanations(self) -> dict[tuple[int, int], str]:
        return {(r["layer"], r["head"]): r["explanation"] for r in self.rows()}


class SimulateRun(StageRun):
    """The simulate stage; its outdir needs events.parquet and explanations.jsonl
    (`copy_explained`). Give simulation_method: "auto" probes the endpoint for echo
    support on every run, even one that finds every answer in the cache."""

    stage = "simulate"

    def scores(self):
        import pandas as pd

        return pd.read_parquet(self.outdir / "scores.parquet")


SCORE_COLUMNS = ("score", "score_top", "score_random", "baseline_score")


def copy_explained(explained: Path, outdir: Path) -> Path:
    """A fresh outdir holding what the simulate stage reads."""
    import shutil

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for name in ("events.parquet", "explanations.jsonl"):
        shutil.copy2(Path(explained) / name, outdir / name)
    return outdir


def score_differences(a, b) -> list[str]:
    """How two scores.parquet frames differ: same heads in the same order, every score
    column exactly equal (not within a tolerance: a resumed or cached rerun must write
    the same bytes) and NaN exactly where the other is NaN. [] if they agree."""
    import math

    out = []
    keys_a = list(zip(a["layer"], a["head"], strict=True))
    keys_b = list(zip(b["layer"], b["head"], strict=True))
    if keys_a != keys_b:
        return [f"heads differ: {keys_a} vs {keys_b}"]
    for col in SCORE_COLUMNS:
        for key, x, y in zip(keys_a, a[col], b[col], strict=True):
            if math.isnan(x) != math.isnan(y) or (not math.isnan(x) and x != y):
                out.append(f"{col} of {key}: {x!r} vs {y!r}")
    return out


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


def kill_and_resume(
    prepared: Path, workdir: Path, proxy: FaultProxy, kill_after: int = 2
) -> dict[str, Any]:
    """The kill-and-resume scenario against `proxy` (-> a llama.cpp server):

    1. a clean run (own cache) gives the reference explanations and N requests;
    2. a second run (own cache) is SIGKILLed once `kill_after` heads are written, with
       the next request in flight (held at the proxy, so the moment is exact);
    3. the same run again resumes: its requests should be N - (calls cached at the kill);
    4. a third run repeats everything from the cache: 0 requests.
    Returns the numbers and explanations of every step.
    """
    from llama_server import copy_artifacts

    out: dict[str, Any] = {}
    proxy.plan()
    clean = ExplainRun(copy_artifacts(prepared, workdir / "clean"), proxy.url,
                       workdir / "clean.sqlite")  # fmt: skip
    res = clean.run()
    if res.returncode != 0:
        raise AssertionError(f"clean run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out["clean_s"] = res.seconds
    out["clean"] = clean.metrics()
    out["clean_explanations"] = clean.explanations()
    out["clean_posts"] = len(proxy.posts("/chat/completions"))

    proxy.reset_records()
    proxy.plan(*[PASS] * kill_after, then=HOLD)
    run = ExplainRun(copy_artifacts(prepared, workdir / "killed"), proxy.url,
                     workdir / "killed.sqlite")  # fmt: skip
    t0 = time.monotonic()
    run.start()
    try:
        wait_until(lambda: len(run.partial_rows()) >= kill_after and proxy.held > 0, 180,
                   f"{kill_after} finished heads and a held request")  # fmt: skip
    except AssertionError:
        run.kill()
        raise
    run.kill()
    out["killed_s"] = time.monotonic() - t0
    out["killed_posts"] = len(proxy.posts("/chat/completions"))
    out["partial_at_kill"] = len(run.partial_rows())
    out["cached_at_kill"] = run.cache_rows()
    out["final_after_kill"] = (run.outdir / "explanations.jsonl").exists()
    wait_until(lambda: proxy.held == 0, 10, "the proxy to drop the killed run's request")
    out["dropped"] = sum(r.outcome == "dropped" for r in proxy.posts())

    proxy.reset_records()
    proxy.plan()
    proxy.release()
    res = run.run()
    if res.returncode != 0:
        raise AssertionError(f"resumed run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out["resumed_s"] = res.seconds
    out["resumed"] = run.metrics()
    out["resumed_posts"] = len(proxy.posts("/chat/completions"))
    out["resumed_explanations"] = run.explanations()
    out["partial_after_resume"] = run.partial.exists()

    proxy.reset_records()
    res = run.run()
    if res.returncode != 0:
        raise AssertionError(f"third run failed ({res.returncode}):\n{res.stderr[-3000:]}")
    out["rerun_s"] = res.seconds
    out["rerun"] = run.metrics()
    out["rerun_posts"] = len(proxy.posts("/chat/completions"))
    out["rerun_explanations"] = run.explanations()
    return out


def kill_and_resume_simulate(
    explained: Path, workdir: Path, proxy: FaultProxy, kill_after: int = 2, method: str = "chat"
) -> dict[str, Any]:
    """The kill-and-resume scenario for the simulate stage against `proxy` (-> a llama.cpp
    server with --logits_all), on an outdir holding events.parquet and explanations.jsonl:

    1. a clean run (own cache) gives the reference scores and N requests;
    2. a second run (own cache) is SIGKILLed once `kill_after` calls are answered and
       cached, with the next one in flight (held at the proxy; one request at a time);
    3. the same run again: it should pay only for the calls not cached at the kill;
    4. a third run repeats everything from the cache: 0 requests.
    Every run sends one request at a time and never retries (llm_max_retries=0: at
    temperature 0 a retried unusable reply comes back the same, and one POST per call
    keeps the kill exact). With method "echo" each run that scores anything also sends
    the one-token echo probe first (not counted in llm.requests); `*_posts` count all
    POSTs. Returns the numbers and scores of every step.
    """
    out: dict[str, Any] = {}
    probe = 1 if method == "echo" else 0
    opts: dict[str, Any] = {"simulation_method": method, "llm_max_retries": 0}

    def finished(run: SimulateRun, what: str) -> StageResult:
        res = run.run()
        if res.returncode != 0:
            raise AssertionError(f"{what} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return res

    proxy.reset_records()
    proxy.plan()
    clean = SimulateRun(copy_explained(explained, workdir / "sim_clean"), proxy.url,
                        workdir / "sim_clean.sqlite", **opts)  # fmt: skip
    out["clean_s"] = finished(clean, "clean simulate run").seconds
    out["clean"] = clean.metrics()
    out["clean_scores"] = clean.scores()
    out["clean_posts"] = len(proxy.posts())
    out["clean_cache_rows"] = clean.cache_rows()

    proxy.reset_records()
    proxy.plan(*[PASS] * (probe + kill_after), then=HOLD)
    run = SimulateRun(copy_explained(explained, workdir / "sim_killed"), proxy.url,
                      workdir / "sim_killed.sqlite", **opts)  # fmt: skip
    t0 = time.monotonic()
    run.start()
    try:
        wait_until(lambda: run.cache_rows() >= kill_after and proxy.held > 0, 180,
                   f"{kill_after} cached calls and a held request")  # fmt: skip
    except AssertionError:
        run.kill()
        raise
    run.kill()
    out["killed_s"] = time.monotonic() - t0
    out["killed_posts"] = len(proxy.posts())
    out["cached_at_kill"] = run.cache_rows()
    out["final_after_kill"] = (run.outdir / "scores.parquet").exists()
    wait_until(lambda: proxy.held == 0, 10, "the proxy to drop the killed run's request")
    out["dropped"] = sum(r.outcome == "dropped" for r in proxy.posts())

    proxy.reset_records()
    proxy.plan()
    proxy.release()
    out["resumed_s"] = finished(run, "resumed simulate run").seconds
    out["resumed"] = run.metrics()
    out["resumed_posts"] = len(proxy.posts())
    out["resumed_scores"] = run.scores()

    proxy.reset_records()
    out["rerun_s"] = finished(run, "third simulate run").seconds
    out["rerun"] = run.metrics()
    out["rerun_posts"] = len(proxy.posts())
    out["rerun_scores"] = run.scores()
    out["probe_posts"] = probe
    return out
