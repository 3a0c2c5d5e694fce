"""What an OpenAI-compatible endpoint answers, read: which errors are transient and
how long the server asked us to wait (the retry policy's questions, llm/policy.py),
chat and echo logprobs, and the forms of a JSON-schema constraint to try."""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any

from head_explain.llm.openai_urls import is_openai_url, one_line
from head_explain.llm.results import TokenLogprob, logsumexp


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


def as_dict(resp: Any) -> dict:
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


def echo_logprobs(raw: dict) -> dict | None:
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
