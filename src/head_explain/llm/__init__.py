"""LLM access for the explainer and the simulator; the only package that talks to LLMs.

`make_backend(cfg, role)` gives an `LLMBackend` (embedded SmolLM2 in-process, or any
OpenAI-compatible endpoint) with a response cache, retries and statistics;
`check_ready(cfg)` fails fast, before any work, when the configured LLM cannot be used.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from head_explain.errors import ConfigError, LLMError
from head_explain.llm.base import (
    ChatResult,
    LLMBackend,
    LLMStats,
    ScoreResult,
    TokenLogprob,
    label_calls,
)
from head_explain.llm.cache import LLMCache, cache_key, open_cache

if TYPE_CHECKING:
    from head_explain.config import Config

log = logging.getLogger(__name__)

ROLES = ("explainer", "simulator")
READY_TIMEOUT_S = 5.0

__all__ = [
    "ChatResult",
    "LLMBackend",
    "LLMCache",
    "LLMStats",
    "ScoreResult",
    "TokenLogprob",
    "cache_key",
    "check_ready",
    "identity_for",
    "label_calls",
    "make_backend",
    "model_for",
]


def model_for(cfg: Config, role: str) -> str:
    """The model name a role uses (what make_backend(cfg, role).model will be)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if cfg.llm == "embedded":
        from head_explain.llm.embedded import MODEL_NAME

        return MODEL_NAME
    if role == "simulator" and cfg.simulator_model:
        return cfg.simulator_model
    return cfg.openai_model


def identity_for(cfg: Config, role: str) -> dict:
    """The backend identity part of `role`'s cache keys, without building a backend
    (no key needed, nothing sent): what make_backend(cfg, role).identity() returns."""
    if cfg.llm == "embedded":
        from head_explain.llm.embedded import MODEL_NAME
        from head_explain.models import bundled_gguf

        return {"kind": "embedded", "model": MODEL_NAME, "base_url": "",
                "weights": bundled_gguf().stat().st_size}  # fmt: skip
    from head_explain.llm.openai_backend import resolve_base_url

    return {"kind": "openai", "model": model_for(cfg, role),
            "base_url": resolve_base_url(cfg.openai_base_url)[0]}  # fmt: skip


def make_backend(cfg: Config, role: str) -> LLMBackend:
    """A backend for `role` ("explainer" or "simulator"); close it with `aclose()`."""
    backend = _make_backend(cfg, role)
    backend.role = role
    backend.max_cost_usd = float(getattr(cfg, "max_cost_usd", 0.0) or 0.0)
    return backend


def _make_backend(cfg: Config, role: str) -> LLMBackend:
    model = model_for(cfg, role)
    if cfg.llm not in ("embedded", "openai"):
        raise ConfigError(f"key 'llm': {cfg.llm!r} is not one of embedded, openai")
    cache = open_cache(cfg.llm_cache)
    if cfg.llm == "embedded":
        from head_explain.llm.embedded import EmbeddedBackend

        return EmbeddedBackend(cache=cache, concurrency=cfg.llm_concurrency)
    from head_explain.llm.openai_backend import OpenAIBackend

    try:
        return OpenAIBackend(
            model,
            base_url=cfg.openai_base_url,
            timeout_s=cfg.llm_timeout_s,
            max_retries=cfg.llm_max_retries,
            concurrency=cfg.llm_concurrency,
            cache=cache,
        )
    except BaseException:
        if cache is not None:
            cache.close()
        raise


def check_ready(cfg: Config) -> None:
    """Fail fast with one line when the configured LLM cannot be used.

    embedded: the bundled weights must be installed. openai: OpenAI's own API needs
    OPENAI_API_KEY; any endpoint must answer GET /models within a few seconds and must
    not reject the key. The cache file must be usable in both cases.
    """
    if cfg.llm == "embedded":
        from head_explain.models import bundled_gguf

        bundled_gguf()
        _check_cache(cfg)
        return
    if cfg.llm != "openai":
        raise ConfigError(f"key 'llm': {cfg.llm!r} is not one of embedded, openai")
    from head_explain.llm.openai_backend import (
        api_key_for,
        client_url,
        install_log_filter,
        missing_key_message,
        one_line,
        redact,
        redact_url,
        resolve_base_url,
        url_secrets,
    )

    url, source = resolve_base_url(cfg.openai_base_url)
    key = api_key_for(url)
    if key is None:
        raise LLMError(missing_key_message())
    _check_cache(cfg)  # after the key check: a refused run creates no cache file
    import httpx

    timeout = min(READY_TIMEOUT_S, cfg.llm_timeout_s)
    shown = redact_url(url)  # a base URL may carry credentials: never print them
    named = f"{source} '{shown}'" if source != "default" else f"OpenAI's API '{shown}'"
    try:
        base, query, _ = client_url(url)
        install_log_filter()
        resp = httpx.get(
            f"{base}/models",
            params=query,
            headers={"Authorization": f"Bearer {key}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        why = one_line(redact(f"{type(exc).__name__}: {exc}", key, url_secrets(url)), 160)
        raise LLMError(
            f"{named} does not answer within {timeout:g}s ({why}); start the server, fix "
            "the URL, or run offline with `--llm embedded`"
        ) from None
    if resp.status_code in (401, 403):
        raise LLMError(
            f"{named} rejected the API key (HTTP {resp.status_code}); check OPENAI_API_KEY"
        )
    log.info("LLM endpoint %s answers (HTTP %d)", shown, resp.status_code)


def _check_cache(cfg: Config) -> None:
    cache = open_cache(cfg.llm_cache)
    if cache is not None:
        cache.close()
