"""OpenAI, or any server that speaks its API (llama.cpp, vLLM, ...), via the official client.

The client's own retries are off: every request goes through the one retry policy of
llm/policy.py (tenacity), so that each retry is counted in the run's statistics,
Retry-After is honoured with jitter, a truncated or non-JSON body (a proxy hiccup) is
retried like a 5xx, and transport faults and unusable replies share one budget: a call
costs at most `max_retries + 1` requests. This module only says which errors are
transient (`is_retryable`) and how long the server asked us to wait (`retry_after_s`).
The API key is passed to the client and nowhere else: every message we raise or log
goes through `redact`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import os
import re
import threading
import time
from typing import Any
from urllib.parse import urlparse

import tenacity

from head_explain.errors import LLMError
from head_explain.llm.base import (
    ChatResult,
    LLMBackend,
    ScoreResult,
    TokenLogprob,
    logsumexp,
)
from head_explain.llm.cache import LLMCache, cache_key
from head_explain.llm.policy import backoff_s, retry_policy
from head_explain.llm.pricing import cost_usd

log = logging.getLogger(__name__)

OPENAI_URL = "https://api.openai.com/v1"
DUMMY_KEY = "not-needed"  # local servers ignore the key, but the client insists on one
ECHO_LOGPROBS = 10  # top alternatives per prompt token (llama.cpp / vLLM accept 10+)
ECHO_PROBE_PROMPT = "1 2 3 4 5"  # short: echo is slow on llama.cpp
__all__ = ["backoff_s"]


# --- endpoint and key -------------------------------------------------------------------
def resolve_base_url(setting: str = "") -> tuple[str, str]:
    """(base URL, where it came from): the setting, else $OPENAI_BASE_URL, else OpenAI."""
    if setting.strip():
        return setting.strip().rstrip("/"), "openai_base_url"
    env = os.environ.get("OPENAI_BASE_URL", "").strip()
    if env:
        return env.rstrip("/"), "OPENAI_BASE_URL"
    return OPENAI_URL, "default"


def is_openai_url(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    return host == "openai.com" or host.endswith(".openai.com")


def api_key_for(url: str) -> str | None:
    """$OPENAI_API_KEY, else a key given as the URL's password (http://user:KEY@host);
    a placeholder for third-party servers; None if OpenAI lacks one."""
    key = os.environ.get("OPENAI_API_KEY", "").strip() or (urlparse(url).password or "")
    if key:
        return key
    return None if is_openai_url(url) else DUMMY_KEY


_KEYLIKE = re.compile(r"\b(sk-|sess-)[A-Za-z0-9_\-*.]{4,}")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/@\s?#]*@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?:api[_-]?key|key|token|secret|password|passwd|pwd|auth|"
    r"access[_-]?token|sig|signature|code)=)[^&#\s\"']*"
)


def redact_url(text: str) -> str:
    """`text` with every URL's userinfo (user:key@) and secret-looking query values
    (?api_key=..., &token=...) removed: a base URL may carry credentials."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1", text))


def client_url(url: str) -> tuple[str, dict[str, str], str | None]:
    """(base URL without userinfo and query, the query as default parameters, the
    userinfo's password): the client joins paths onto the base URL, so a query left in
    it would end up before the path, and userinfo would be logged by the HTTP library."""
    from urllib.parse import parse_qsl, urlunparse

    p = urlparse(url)
    netloc = p.hostname or ""
    if p.port:
        netloc += f":{p.port}"
    base = urlunparse((p.scheme, netloc, p.path, "", "", "")) if p.hostname else url
    return base, dict(parse_qsl(p.query)), p.password


class RedactURLs(logging.Filter):
    """Scrub URL credentials from the HTTP libraries' own log lines (they log each URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        record.msg = redact_url(str(record.msg))
        return True


def install_log_filter() -> None:
    for name in ("httpx", "httpx2", "openai", "httpcore"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactURLs) for f in lg.filters):
            lg.addFilter(RedactURLs())


def url_secrets(url: str) -> list[str]:
    """The credentials a URL carries (userinfo password or user, secret query values)."""
    from urllib.parse import parse_qsl

    parts = urlparse(url)
    found = [v for v in (parts.password, parts.username) if v and len(v) >= 4]
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if _SECRET_QUERY.match(f"?{name}=") and len(value) >= 4:
            found.append(value)
    return found


def redact(text: str, key: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> str:
    """`text` without the key, any part of it servers echo back, key-like strings, URL
    credentials, or any of the `extra` secrets."""
    for secret in (key, *extra):
        if not secret or secret == DUMMY_KEY:
            continue
        text = text.replace(secret, "***")
        for n in (12, 8):  # "Incorrect API key provided: sk-abcd****wxyz"
            if len(secret) > 2 * n:
                text = text.replace(secret[:n], "***").replace(secret[-n:], "***")
    return redact_url(_KEYLIKE.sub("***", text))


def redact_json(value: Any, key: str | None, extra: list[str] | tuple[str, ...] = ()) -> Any:
    """A JSON-able value with `redact` applied to every string in it (keys included):
    a server that echoes the Authorization header must not put the key on disk."""
    return json.loads(redact(json.dumps(value, ensure_ascii=False), key, extra))


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- retries ----------------------------------------------------------------------------
class MalformedResponse(Exception):
    """A 2xx answer that is not the JSON we asked for (truncated, HTML, missing fields)."""


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (Retry-After / retry-after-ms), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def is_retryable(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    if isinstance(exc, openai.APIConnectionError | MalformedResponse | json.JSONDecodeError):
        return True  # APITimeoutError is an APIConnectionError
    try:
        import httpx2

        if isinstance(exc, httpx2.TransportError):
            return True
    except ImportError:
        pass
    import httpx

    return isinstance(exc, httpx.TransportError)


def describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    head = type(exc).__name__ + (f" {status}" if status else "")
    return f"{head}: {exc}" if str(exc) else head


# --- response parsing -------------------------------------------------------------------
def chat_logprobs(choice: dict) -> list[TokenLogprob] | None:
    """Chat logprobs in the chat format ({content: [...]}) or the legacy completion one."""
    lp = choice.get("logprobs")
    if not lp:
        return None
    if lp.get("content") is not None:
        return [
            TokenLogprob(
                t["token"],
                float(t["logprob"]),
                {a["token"]: float(a["logprob"]) for a in (t.get("top_logprobs") or [])},
            )
            for t in lp["content"]
        ]
    if lp.get("tokens") is not None:
        tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
        return [
            TokenLogprob(t, float(v if v is not None else math.nan), dict(top or {}))
            for t, v, top in zip(lp["tokens"], lp["token_logprobs"], tops, strict=False)
        ]
    return None


def echo_alignment(prompt: str, lp: dict) -> int:
    """0 if top_logprobs[i] is the distribution of token i (the OpenAI convention), 1 if
    it is the distribution of token i+1 (llama-cpp-python's echo for models without a
    BOS token). Decided on a predictable prompt by which token the top guess matches."""
    tokens, tops = lp["tokens"], lp["top_logprobs"]
    same = nxt = 0
    for i, top in enumerate(tops):
        if not top:
            continue
        best = max(top, key=top.get)
        same += best == tokens[i]
        nxt += i + 1 < len(tokens) and best == tokens[i + 1]
    return 1 if nxt > same else 0


def _matching_top(top: dict[str, float] | None, candidates: list[str]) -> dict[str, float] | None:
    if not top:
        return None
    found: dict[str, list[float]] = {}
    wanted = {c.strip(): c for c in candidates}
    for tok, lp in top.items():
        c = wanted.get(tok.strip())
        if c is not None and lp is not None:
            found.setdefault(c, []).append(float(lp))
    # "5" and " 5" are the same answer; their probabilities add up.
    return {c: logsumexp(v) for c, v in found.items()} or None


def read_slots(
    prompt: str, lp: dict, slot_offsets: list[int], candidates: list[str], shift: int
) -> list[dict[str, float] | None]:
    """Candidate logprobs at each slot from an echo response's prompt logprobs.

    The distribution of "the token starting at offset o" is top_logprobs[j] for the token
    j that starts at o (shift 0), or top_logprobs[j] for the token j that ends at o
    (shift 1). When o follows whitespace that the server's tokenizer glued to the next
    token (" 5"), the token starting at that whitespace stands in for it.
    """
    tokens, offsets, tops = lp["tokens"], lp["text_offset"], lp["top_logprobs"]
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    for j, (tok, off) in enumerate(zip(tokens, offsets, strict=False)):
        if tok:
            starts.setdefault(off, j)
            ends[off + len(tok)] = j
    out: list[dict[str, float] | None] = []
    for o in slot_offsets:
        places = [o]
        b = o
        while b > 0 and prompt[b - 1].isspace():
            b -= 1
            places.append(b)
        result = None
        for p in places:
            j = starts.get(p) if shift == 0 else ends.get(p)
            if j is not None and j < len(tops):
                result = _matching_top(tops[j], candidates)
                break
        out.append(result)
    return out


# --- the backend ------------------------------------------------------------------------
class OpenAIBackend(LLMBackend):
    kind = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "",
        timeout_s: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 4,
        cache: LLMCache | None = None,
        http_client: Any = None,
        sync_http_client: Any = None,
    ):
        super().__init__(model, cache, concurrency)
        self.base_url, _ = resolve_base_url(base_url)
        self.shown_url = redact_url(self.base_url)  # what logs and errors name
        self.local = not is_openai_url(self.base_url)
        key = api_key_for(self.base_url)
        if key is None:
            raise LLMError(missing_key_message())
        self._key = key
        self._secrets = url_secrets(self.base_url)
        self._client_url, self._query, _ = client_url(self.base_url)
        install_log_filter()
        self._schema_formats = list(schema_formats(self.base_url))  # see _chat
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self._http_client = http_client  # tests inject transports here
        self._sync_http_client = sync_http_client
        self._client: Any = None
        self._client_loop: int | None = None
        self._echo: bool | None = False if not self.local else None
        self._shift = 0  # see echo_alignment
        self._echo_why = "" if self.local else " (OpenAI's API no longer combines them)"
        self._probe_lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "base_url": self.base_url}

    def _what(self, op: str) -> str:
        return f"{op} (model '{self.model}' at {self.shown_url})"

    def _redact(self, text: str) -> str:
        return redact(text, self._key, self._secrets)

    # --- the retry policy's questions (llm/policy.py) ---------------------------------
    def is_transient(self, exc: BaseException) -> bool:
        return is_retryable(exc)

    def is_throttle(self, exc: BaseException) -> bool:
        return getattr(exc, "status_code", None) == 429

    def retry_after(self, exc: BaseException) -> float | None:
        return retry_after_s(exc)

    def describe(self, exc: BaseException) -> str:
        return describe(exc)

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        return cost_usd(self.model, prompt_tokens, completion_tokens, local=self.local)

    def client(self) -> Any:
        """The async client of the running loop (connection pools are loop-bound)."""
        from openai import AsyncOpenAI

        loop = id(asyncio.get_running_loop())
        if self._client is None or (self._client_loop != loop and self._http_client is None):
            self._client = AsyncOpenAI(
                api_key=self._key,
                base_url=self._client_url,
                default_query=self._query or None,
                timeout=self.timeout_s,
                max_retries=0,
                http_client=self._http_client,
            )
            self._client_loop = loop
        return self._client

    async def _chat(
        self,
        messages: list[dict],
        max_tokens: int,
        temperature: float,
        top_logprobs: int,
        seed: int | None = None,
        json_schema: dict | None = None,
    ) -> ChatResult:
        kwargs: dict[str, Any] = {}
        if top_logprobs > 0:
            kwargs = {"logprobs": True, "top_logprobs": top_logprobs}
        if seed is not None:
            kwargs["seed"] = seed
        t0 = time.perf_counter()
        while True:
            fmt = self._schema_formats[0] if json_schema and self._schema_formats else None
            extra = {"response_format": response_format(fmt, json_schema)} if fmt else {}
            try:
                resp = await self.client().chat.completions.create(
                    model=self.model, messages=messages, max_tokens=max_tokens,
                    temperature=temperature, **kwargs, **extra,
                )  # fmt: skip
                break
            except Exception as exc:
                if fmt is None or not rejects_format(exc):
                    raise
                # This endpoint does not take that form of schema: try the next form, at
                # last free text (the validator still checks the reply). Not a retry.
                log.info("%s: response_format %s not accepted (%s)", self.shown_url, fmt,
                         one_line(self._redact(describe(exc)), 160))  # fmt: skip
                if self._schema_formats and self._schema_formats[0] == fmt:
                    self._schema_formats.pop(0)
        raw = _as_dict(resp)
        choices = raw.get("choices") or []
        if not choices or not isinstance(choices[0].get("message"), dict):
            raise MalformedResponse(f"no choices in the response: {one_line(str(raw), 120)}")
        raw = redact_json(raw, self._key, self._secrets)  # echoed headers stay off disk
        choice = raw["choices"][0]
        usage = raw.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return ChatResult(
            text=choice["message"].get("content") or "",
            prompt_tokens=pt,
            completion_tokens=ct,
            latency_s=time.perf_counter() - t0,
            cost_usd=cost_usd(self.model, pt, ct, local=self.local),
            cached=False,
            logprobs=chat_logprobs(choice),
            raw=raw,
        )

    # --- echo scoring ----------------------------------------------------------------
    def _no_echo(self, why: str = "") -> LLMError:
        return LLMError(
            one_line(
                f"{self._what('score_prompt')}: the endpoint does not return prompt logprobs "
                f"(/v1/completions with echo=true and logprobs){why}; use "
                "--simulation_method chat",
                400,
            )
        )

    def supports_echo(self) -> bool:
        """Probe /v1/completions with echo+logprobs once; OpenAI's own API: False."""
        if self._echo is not None:
            return self._echo
        with self._probe_lock:
            if self._echo is None and not self._probe_from_cache():
                self._probe()
                self._store_probe()
        return bool(self._echo)

    def _probe_key(self) -> str:
        return cache_key({**self.identity(), "probe": "echo", "prompt": ECHO_PROBE_PROMPT})

    def _probe_from_cache(self) -> bool:
        """A definitive probe verdict from an earlier run: a cached rerun sends nothing."""
        if self._cache is None:
            return False
        hit = self._cache.get(self._probe_key())
        if hit is None:
            return False
        self._echo, self._shift, self._echo_why = hit["echo"], hit["shift"], hit["why"]
        self.stats.cache_hits += 1
        return True

    def _store_probe(self) -> None:
        if self._cache is not None and self._echo is not None:
            value = {"echo": self._echo, "shift": self._shift, "why": self._echo_why}
            self._cache.put(self._probe_key(), value)

    def _probe(self) -> None:
        import openai

        client = openai.OpenAI(
            api_key=self._key, base_url=self._client_url, default_query=self._query or None,
            timeout=self.timeout_s, max_retries=0, http_client=self._sync_http_client,
        )  # fmt: skip

        def on_retry(state: tenacity.RetryCallState, delay: float) -> None:
            self.stats.retries += 1
            exc = state.outcome.exception() if state.outcome else None
            log.warning("%s", one_line(self._redact(
                f"{self._what('echo probe')}: {describe(exc) if exc else '?'}; retry "
                f"{state.attempt_number}/{self.max_retries} in {delay:.1f}s")))  # fmt: skip

        policy = retry_policy(
            max_retries=self.max_retries, transient=is_retryable, retry_after=retry_after_s,
            on_retry=on_retry,
        )  # fmt: skip
        tries = 0
        try:
            for attempt in tenacity.Retrying(sleep=time.sleep, **policy):
                with attempt:
                    tries = attempt.retry_state.attempt_number
                    resp = client.completions.create(
                        model=self.model, prompt=ECHO_PROBE_PROMPT, echo=True, logprobs=1,
                        max_tokens=1, temperature=0,
                    )  # fmt: skip
                    lp = _echo_logprobs(_as_dict(resp))
        except Exception as exc:
            why = one_line(self._redact(describe(exc)), 200)
            if is_retryable(exc):  # transient to the end: do not remember an answer
                tried = f" after {tries - 1} retries" if tries > 1 else ""
                raise LLMError(f"{self._what('echo probe')} failed{tried}: {why}") from None
            log.info("no echo logprobs at %s: %s", self.shown_url, why)
            self._echo, self._echo_why = False, f" ({why})"
            return
        finally:
            if self._sync_http_client is None:
                client.close()
        if lp is None or len(lp["tokens"]) < 4:
            self._echo = False
            return
        self._shift = echo_alignment(ECHO_PROBE_PROMPT, lp)
        self._echo = True
        log.info("echo logprobs at %s (alignment shift %d)", self.shown_url, self._shift)

    async def _score(
        self, prompt: str, slot_offsets: list[int], candidates: list[str]
    ) -> ScoreResult:
        if self._echo is None:
            await asyncio.to_thread(self.supports_echo)
        if not self._echo:
            raise self._no_echo(self._echo_why)
        t0 = time.perf_counter()
        resp = await self.client().completions.create(
            model=self.model, prompt=prompt, echo=True, logprobs=ECHO_LOGPROBS,
            max_tokens=1, temperature=0,
        )  # fmt: skip
        raw = _as_dict(resp)
        if not raw.get("choices"):
            raise MalformedResponse(f"no choices in the response: {one_line(str(raw), 120)}")
        lp = _echo_logprobs(raw)
        if lp is None:  # the probe saw them: this reply is broken
            raise MalformedResponse("no prompt logprobs in the response")
        usage = raw.get("usage") or {}
        pt, ct = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        return ScoreResult(
            slots=read_slots(prompt, lp, slot_offsets, candidates, self._shift),
            prompt_tokens=pt,
            latency_s=time.perf_counter() - t0,
            cost_usd=cost_usd(self.model, pt, ct, local=self.local),
            cached=False,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # a closed loop's client cannot close
                await self._client.close()
            self._client = None
        await super().aclose()


def _as_dict(resp: Any) -> dict:
    """A client response -> plain JSON-able dict; anything else is malformed."""
    if hasattr(resp, "model_dump"):
        d = resp.model_dump(mode="json", exclude_none=False)
    elif isinstance(resp, dict):
        d = resp
    else:
        raise MalformedResponse(
            f"expected JSON, got {type(resp).__name__}: {one_line(str(resp), 80)}"
        )
    return json.loads(json.dumps(d, default=float))


def _echo_logprobs(raw: dict) -> dict | None:
    """The prompt+completion logprobs of an echo response, if it carries them."""
    choices = raw.get("choices") or []
    lp = choices[0].get("logprobs") if choices else None
    if not lp or not lp.get("tokens") or not lp.get("text_offset") or not lp.get("top_logprobs"):
        return None
    return lp


def schema_formats(url: str) -> tuple[str, ...]:
    """The forms of a JSON-schema constraint to try at `url`, in order. OpenAI's API:
    Structured Outputs (`json_schema`). Other servers: first {"type": "json_object",
    "schema": ...}, which both llama.cpp servers (llama-cpp-python's and llama.cpp's
    own) enforce, so a run against them never pays for a refused request; then
    `json_schema` (vLLM and others). An endpoint that refuses one (HTTP 400/422, or
    llama-cpp-python's 500 naming response_format) gets the next; after the last, free
    text (the validator still checks every reply)."""
    return ("json_schema",) if is_openai_url(url) else ("json_object", "json_schema")


def response_format(fmt: str, schema: dict) -> dict:
    if fmt == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "reply", "strict": True,
                                                       "schema": schema}}  # fmt: skip
    return {"type": "json_object", "schema": schema}


def rejects_format(exc: BaseException) -> bool:
    """A 400/422 (llama-cpp-python: a 500) that names the response_format (or its schema)."""
    if getattr(exc, "status_code", None) not in (400, 422, 500):
        return False
    text = f"{exc} {json.dumps(getattr(exc, 'body', None), default=str)}".lower()
    return "response_format" in text or "json_schema" in text


def missing_key_message() -> str:
    return (
        "llm=openai needs OPENAI_API_KEY in the environment for OpenAI's API; set it, "
        "point openai_base_url at a compatible server, or run offline with `--llm embedded`"
    )
