"""The engine behind the embedded backend: the bundled SmolLM2-135M-Instruct, loaded
once per process by transformers, with its chat (generate) and scoring (log-probs at
chosen positions) calls.

Torch is not safe for concurrent forward passes on one model, so every call holds one
lock; the backend (embedded.py) runs them in worker threads and queues scoring prompts.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from typing import Any

from head_explain.errors import LLMError
from head_explain.llm.results import ChatOptions, TokenLogprob

log = logging.getLogger(__name__)

MODEL_NAME = "smollm2-135m-instruct"
MIN_PREFIX_TOKENS = 32  # a shorter shared prefix is not worth a KV copy
MAX_PREFIXES = 4


class Engine:
    """The loaded model and tokenizer, shared by every embedded backend of the process."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from head_explain.models import bundled_hf_dir

        t0 = time.perf_counter()
        folder = bundled_hf_dir()
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.identity = folder.name  # changes when the bundled weights change
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))
        pad = self.tok.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tok.eos_token_id)
        self.lock = threading.Lock()  # one forward pass at a time
        # Shared prompt prefixes (token ids -> their KV cache), e.g. the simulation
        # prompt's instructions and few-shot example: computed once, reused by every
        # prompt that starts with exactly those tokens (see `share_prefix`).
        self.prefixes: dict[tuple[int, ...], Any] = {}
        # transformers 5 renames the KV argument later; today's name is the working one,
        # and its FutureWarning would otherwise repeat in every stage log
        warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated",
                                category=FutureWarning)  # fmt: skip
        log.info("embedded LLM %s loaded in %.1fs", MODEL_NAME, time.perf_counter() - t0)

    # --- chat ----------------------------------------------------------------------
    def chat(self, messages: list[dict], opts: ChatOptions) -> dict[str, Any]:
        torch = self.torch
        max_tokens, temperature, top_logprobs = opts.max_tokens, opts.temperature, opts.top_logprobs
        seed = opts.seed
        # A trailing assistant message is a prefill the model continues (the reply is
        # only the continuation), which keeps a small model on the requested form.
        prefill = bool(messages) and messages[-1]["role"] == "assistant"
        text = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not prefill,
            continue_final_message=prefill,
        )  # fmt: skip
        ids = self.tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_prompt = int(ids.shape[1])
        if n_prompt + max_tokens > self.n_ctx:
            raise LLMError(
                f"embedded LLM: prompt of {n_prompt} tokens + max_tokens {max_tokens} exceeds "
                f"the context of {self.n_ctx} tokens; shorten the prompt"
            )
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if opts.stop_pattern:
            sampling["stopping_criteria"] = [_PatternStop(self.tok, n_prompt, opts.stop_pattern)]
        with self.lock, torch.inference_mode():
            if temperature > 0:  # sampled: seeded, so a rerun gives the same reply
                torch.manual_seed(0 if seed is None else seed)
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                pad_token_id=self.pad_id,
                output_logits=top_logprobs > 0,
                return_dict_in_generate=True,
                **sampling,
            )
        gen = out.sequences[0, n_prompt:].tolist()
        logprobs = None
        if top_logprobs > 0:
            logprobs = []
            for step, tok_id in enumerate(gen):
                lp = torch.log_softmax(out.logits[step][0].float(), dim=-1)
                vals, idx = lp.topk(top_logprobs)
                top: dict[str, float] = {}
                for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
                    s = self.tok.decode([i])
                    top[s] = max(top.get(s, -float("inf")), v)
                logprobs.append(TokenLogprob(self.tok.decode([tok_id]), float(lp[tok_id]), top))
        return {
            "text": self.tok.decode(gen, skip_special_tokens=True),
            "prompt_tokens": n_prompt,
            "completion_tokens": len(gen),
            "logprobs": logprobs,
            "token_ids": gen,
        }

    # --- scoring ---------------------------------------------------------------------
    def encode_slots(self, prompt: str, offsets: list[int]) -> tuple[list[int], dict[int, int]]:
        """Token ids of `prompt` cut at every offset, and offset -> index of its token.

        Tokenizing the pieces separately makes every slot a token boundary, so the
        distribution at the position before it is exactly "what comes at this offset".
        """
        cuts = sorted({o for o in offsets if 0 < o < len(prompt)})
        bounds = [0, *cuts, len(prompt)]
        ids: list[int] = []
        where: dict[int, int] = {0: 0}
        for a, b in zip(bounds, bounds[1:], strict=False):
            ids += self.tok.encode(prompt[a:b], add_special_tokens=False)
            where[b] = len(ids)
        return ids, where

    def candidate_ids(self, candidates: list[str]) -> dict[str, int]:
        """Candidates that are exactly one token -> that token id."""
        found = {}
        for c in candidates:
            ids = self.tok.encode(c, add_special_tokens=False)
            if len(ids) == 1:
                found[c] = ids[0]
        return found

    def share_prefix(self, text: str) -> None:
        """Remember `text`'s KV cache: prompts whose tokens start with its tokens skip it.
        Which prompts use it depends only on their text, so their numbers stay the same
        on every run (they differ from a full pass only in float rounding, ~1e-6)."""
        ids = tuple(self.tok.encode(text, add_special_tokens=False))
        if len(ids) < MIN_PREFIX_TOKENS:
            return
        torch = self.torch
        with self.lock, torch.inference_mode():
            if ids in self.prefixes:  # checked under the lock: computed once
                return
            if len(self.prefixes) >= MAX_PREFIXES:
                self.prefixes.pop(next(iter(self.prefixes)))
            out = self.model.base_model(input_ids=torch.tensor([ids]), use_cache=True)
            self.prefixes[ids] = out.past_key_values

    def _prefix_of(self, ids: list[int], positions: list[int]) -> tuple[int, ...] | None:
        for p in self.prefixes:
            n = len(p)
            if len(ids) > n and tuple(ids[:n]) == p and min(positions) >= n:
                return p
        return None

    def forward_logprobs(self, batch: list[tuple[list[int], list[int]]]) -> list[Any]:
        """For each (ids, positions): log_softmax rows at those positions.

        One forward pass per prompt, never a padded batch: a row's numbers must not
        depend on what it was batched with (padding width and batch size change the
        matrix shapes and so the order of float additions: ~1e-6 differences that made
        a cached rerun or a resumed run differ from the first one). Nor would it pay on
        CPU: 8 prompts of 88-140 tokens after a 300-token shared prefix took 0.231 s
        each padded into one batch against 0.232 s one by one (2 cores; equal lengths,
        which are bit-identical, gain 13%). The queue still takes the lock once per batch. A prompt that starts with a shared prefix runs
        only its own tokens, on a copy of the prefix's KV cache.
        """
        import copy

        torch = self.torch
        out = []
        with self.lock, torch.inference_mode():
            for ids, positions in batch:
                prefix = self._prefix_of(ids, positions)
                if prefix is None:
                    hidden = self.model.base_model(input_ids=torch.tensor([ids]))[0][0]
                    rows = positions
                else:
                    kv = copy.deepcopy(self.prefixes[prefix])
                    rest = torch.tensor([ids[len(prefix) :]])
                    hidden = self.model.base_model(input_ids=rest, past_key_values=kv,
                                                   use_cache=True)[0][0]  # fmt: skip
                    rows = [q - len(prefix) for q in positions]
                h = hidden[rows]  # only the rows we need go through lm_head
                out.append(torch.log_softmax(self.model.lm_head(h).float(), dim=-1))
        return out


class _PatternStop:
    """Generation stopping criterion: the decoded reply so far matches a regex."""

    def __init__(self, tok, n_prompt: int, pattern: str):
        self.tok, self.n_prompt, self.pattern = tok, n_prompt, re.compile(pattern)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = []
        for row in input_ids.tolist():
            text = self.tok.decode(row[self.n_prompt :], skip_special_tokens=True)
            # a character split over tokens decodes as U+FFFD until it is whole: wait
            done.append("\ufffd" not in text and self.pattern.search(text) is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


_ENGINE: Engine | None = None
_ENGINE_LOCK = threading.Lock()


def engine() -> Engine:
    """Load the model once per process (explainer and simulator share it)."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = Engine()
        return _ENGINE


def loaded_engine() -> Engine | None:
    """The engine if this process has loaded it (no lock, no load)."""
    return _ENGINE
