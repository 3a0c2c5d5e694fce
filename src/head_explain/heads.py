"""Head names (`L{layer}H{head}`) and the choice of heads to analyse."""

from __future__ import annotations

import re

import numpy as np

from head_explain.errors import ConfigError

_HEAD_RE = re.compile(r"^L(\d+)H(\d+)$")


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """'L17H3,L18H6' -> [(17, 3), (18, 6)]; empty -> []."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        m = _HEAD_RE.match(part)
        if not m:
            raise ConfigError(f"key 'heads': '{part}' is not a head name like L17H3")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def choose_heads(
    n_layers: int, n_heads: int, max_heads: int, spec: str = ""
) -> list[tuple[int, int]]:
    """The heads to analyse: those listed, else all, else an even spread over layers.

    The spread takes heads in order of (layer, head) at evenly spaced indices so every
    layer is represented in proportion; deterministic for a given model shape.
    """
    listed = parse_heads(spec)
    if listed:
        for layer, head in listed:
            if layer >= n_layers or head >= n_heads:
                raise ConfigError(
                    f"key 'heads': L{layer}H{head} does not exist; the model has layers "
                    f"0-{n_layers - 1} and heads 0-{n_heads - 1}"
                )
        return sorted(set(listed))
    total = n_layers * n_heads
    every = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    if max_heads >= total:
        return every
    idx = np.unique(np.linspace(0, total - 1, max_heads).round().astype(int))
    return [every[i] for i in idx]
