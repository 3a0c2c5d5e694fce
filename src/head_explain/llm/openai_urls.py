"""Where an OpenAI-compatible endpoint is and how to keep its secrets out of sight:
the base URL and the API key it uses, and the redaction every message we raise or
log goes through (a base URL may carry credentials; servers echo keys back)."""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any
from urllib.parse import urlparse

OPENAI_URL = "https://api.openai.com/v1"
DUMMY_KEY = "not-needed"  # local servers ignore the key, but the client insists on one


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


def missing_key_message() -> str:
    return (
        "llm=openai needs OPENAI_API_KEY in the environment for OpenAI's API; set it, "
        "point openai_base_url at a compatible server, or run offline with `--llm embedded`"
    )
