"""Drive a real headless Chromium over the DevTools protocol, stdlib only.

`--remote-debugging-pipe` speaks CDP over file descriptors 3 (commands in) and 4
(replies out), NUL-separated JSON: no port, no websocket library, no network. Used by
the browser tests to load pages from file://, hover, read the DOM, and take screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def ensure_chromium() -> tuple[str | None, str]:
    """The binary, installing Debian's `chromium` with apt-get where missing; else why not."""
    found = find_chromium()
    if found:
        return found, ""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, "chromium is not installed and apt-get is unavailable (needs root)"
    # two test runs on one machine may get here together; dpkg takes one apt-get at a time
    with open(Path(tempfile.gettempdir()) / "head-explain-chromium.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = find_chromium()  # another worker installed it while this one waited
        return (found, "") if found else _apt_install_chromium()


def _apt_install_chromium() -> tuple[str | None, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode:
            # a fresh image has no package lists yet: fetch them, then install
            subprocess.run(["apt-get", "update", "-q"], env=env, check=True,
                           capture_output=True, timeout=600)  # fmt: skip
            subprocess.run(install, env=env, check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"chromium is not installed and `apt-get install chromium` failed ({exc})"
    found = find_chromium()
    return (found, "") if found else (None, "apt-get ran but no chromium binary appeared")


class CDPError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one page; collects console errors and dialogs."""

    def __init__(self, binary: str, width: int = 1400, height: int = 900):
        self._profile = tempfile.mkdtemp(prefix="cdp-profile-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands -> the browser's fd 3
        self._out_r, out_w = os.pipe()  # the browser's fd 4 -> we read replies

        def fds() -> None:  # runs in the child before exec: put the pipes at fds 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, out_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-dev-shm-usage", "--mute-audio",
             f"--user-data-dir={self._profile}", f"--window-size={width},{height}"],
            pass_fds=(3, 4, cmd_r, out_w), preexec_fn=fds,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(cmd_r)
        os.close(out_w)
        self._id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # ------------------------------------------------------------------ protocol
    def _reader(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._out_r, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cv:
                    self._cv.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._cv:
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                        if msg.get("method") == "Page.javascriptDialogOpening":
                            # dismiss at once (a dialog blocks the page); the test sees the event
                            self._post("Page.handleJavaScriptDialog", {"accept": False},
                                       msg.get("sessionId"))  # fmt: skip
                    self._cv.notify_all()

    def _post(self, method: str, params: dict, session: str | None) -> int:
        with self._cv:
            self._id += 1
            mid = self._id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        return mid

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:  # fmt: skip
        mid = self._post(method, params or {}, session)
        deadline = time.time() + timeout
        with self._cv:
            while mid not in self._replies:
                left = deadline - time.time()
                if left <= 0 or self.proc.poll() is not None:
                    raise CDPError(f"{method}: no reply (browser exited: {self.proc.poll()})")
                self._cv.wait(min(left, 0.5))
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        """A command to the page's session."""
        return self.call(method, params, self.session, timeout)

    def wait_event(self, method: str, since: int, timeout: float = 30.0) -> dict:
        deadline = time.time() + timeout
        with self._cv:
            while True:
                for ev in self.events[since:]:
                    if ev.get("method") == method:
                        return ev
                left = deadline - time.time()
                if left <= 0:
                    raise CDPError(f"no {method} within {timeout}s")
                self._cv.wait(min(left, 0.5))

    # ------------------------------------------------------------------ page helpers
    def open(self, url: str, timeout: float = 30.0) -> float:
        """Navigate and wait for the load event; returns the seconds it took."""
        mark = len(self.events)
        t0 = time.perf_counter()
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise CDPError(f"navigate {url}: {reply['errorText']}")
        self.wait_event("Page.loadEventFired", mark, timeout)
        return time.perf_counter() - t0

    def click_and_wait(self, selector: str, timeout: float = 30.0) -> str:
        """Click an element that navigates; wait for the new page's load; return its URL."""
        mark = len(self.events)
        self.eval(f"document.querySelector({json.dumps(selector)}).click()")
        self.wait_event("Page.loadEventFired", mark, timeout)
        return self.eval("location.href")

    def eval(self, expr: str) -> Any:
        res = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True})
        if "exceptionDetails" in res:
            raise CDPError(f"evaluate {expr[:60]!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def hover(self, selector: str) -> None:
        """Move the mouse to the centre of the first element matching `selector`."""
        box = self.eval(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
            "return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        for x, y in ((box[0] - 30, box[1] - 30), (box[0], box[1])):
            self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions, and log errors (CSP violations included)."""
        out = []
        with self._cv:
            events = list(self.events)
        for ev in events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:300])
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + json.dumps(p.get("args", []))[:300])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", "")[:300])
        return out

    def dialogs(self) -> list[dict]:
        with self._cv:
            return [e for e in self.events if e.get("method") == "Page.javascriptDialogOpening"]

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000),
                      "scale": 1},
            )  # fmt: skip
        data = self.send("Page.captureScreenshot", params, timeout=60)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        with contextlib.suppress(CDPError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self._cmd_w, self._out_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)
