"""The reference for head activations: HF eager attention (`output_attentions`) and
‖z·W_O‖ taken from the input of HF's own output projection — no code under test in it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# the attention output projection of one layer, named as each HF architecture names it
O_PROJ = re.compile(r"\.(\d+)\.(self_attn\.o_proj|attn\.c_proj|attention\.dense)$")
V_PROJ = re.compile(r"\.(\d+)\.self_attn\.v_proj$")  # separate V (Llama, Gemma): GQA check


def hf_reference(path, tokens: np.ndarray):
    """Eager attention patterns and per-head ‖z·W_O‖, straight from HF modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()
    n_heads = model.config.num_attention_heads
    o_in: dict[int, torch.Tensor] = {}
    v_out: dict[int, torch.Tensor] = {}
    projs = {}
    for name, module in model.named_modules():
        if m := V_PROJ.search(name):
            module.register_forward_hook(
                lambda mod, args, out, layer=int(m.group(1)): v_out.__setitem__(layer, out.detach())
            )
        if m := O_PROJ.search(name):
            layer = int(m.group(1))
            projs[layer] = module
            module.register_forward_pre_hook(
                lambda mod, args, layer=layer: o_in.__setitem__(layer, args[0].detach())
            )
    with torch.no_grad():
        out = model(torch.as_tensor(tokens), output_attentions=True)
    acts, vnorms = {}, {}
    for layer, proj in projs.items():
        w = proj.weight.detach().double()
        # Linear stores [out, in]; GPT-2's Conv1D stores [in, out]
        w_in_out = w if type(proj).__name__ == "Conv1D" else w.T
        d_head = w_in_out.shape[0] // n_heads
        w_o = w_in_out.reshape(n_heads, d_head, -1)  # [h, d_head, d_model]
        z = o_in[layer].double().reshape(*o_in[layer].shape[:2], n_heads, d_head)
        acts[layer] = torch.einsum("bthd,hdm->bhtm", z, w_o).norm(dim=-1)  # [b, h, t]
        if layer in v_out:  # HF's repeat_kv: query head h reads KV head h // group
            v = v_out[layer].double().reshape(*z.shape[:2], -1, d_head)
            v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
            vnorms[layer] = torch.einsum("bshd,hdm->bhsm", v, w_o).norm(dim=-1)  # [b, h, s]
    return [a.double() for a in out.attentions], acts, vnorms


def check_cache_against_hf(
    path: Path,
    out: Path,
    candidates: int,
    per_window: int,
    rtol: float = 5e-6,
    min_pos: int = 2,
) -> tuple[int, int, bool]:
    """Every head's top events in `out` (a `--until cache` run of the model at `path`)
    against the reference; returns (layers, heads per layer, whether V was separate)."""
    windows = pd.read_parquet(out / "windows.parquet")
    raw = pd.read_parquet(out / "raw_events.parquet")
    stats = pd.read_parquet(out / "head_stats.parquet")
    tokens = np.stack(windows["tokens"].to_numpy())
    row_of = {int(w): i for i, w in enumerate(windows["window_id"])}
    attn, acts, vnorms = hf_reference(path, tokens)
    n_layers, n_heads = len(attn), attn[0].shape[1]
    top = raw[raw["kind"] == "top"]
    assert top.groupby(["layer", "head"]).ngroups == n_layers * n_heads
    for (layer, head), events in top.groupby(["layer", "head"]):
        ref = acts[layer][:, head]  # [b, t]
        got_rows = [row_of[w] for w in events["window_id"]]
        want = ref[got_rows, events["pos"].to_numpy()].numpy()
        np.testing.assert_allclose(events["act"], want, rtol=rtol, atol=1e-9)
        # the events are the true top: best per_window tokens per window from min_pos
        # (config.min_event_pos), best overall
        window_best = ref[:, min_pos:].topk(per_window, dim=1).values.flatten()
        best = window_best.sort(descending=True).values[:candidates].numpy()
        np.testing.assert_allclose(events["act"].to_numpy(), best, rtol=rtol)
        # main source: its attention weight is HF's
        src = np.array([s[0] for s in events["src_pos"]])
        want_attn = attn[layer][got_rows, head, events["pos"].to_numpy(), src].numpy()
        got_attn = np.array([a[0] for a in events["src_attn"]])
        np.testing.assert_allclose(got_attn, want_attn, rtol=rtol, atol=1e-8)
        if layer in vnorms:  # main source = argmax attention × ‖v·W_O‖, with GQA's KV head
            pair = (
                attn[layer][got_rows, head, events["pos"].to_numpy()]
                * vnorms[layer][got_rows, head]
            )
            np.testing.assert_array_equal(src, pair.argmax(-1).numpy())
            got_write = np.array([w[0] for w in events["src_write"]])
            np.testing.assert_allclose(got_write, pair.max(-1).values.numpy(), rtol=rtol)
        st = stats[(stats["layer"] == layer) & (stats["head"] == head)].iloc[0]
        bos = attn[layer][:, head, 1:, 0].mean().item()
        assert st.bos_frac == pytest.approx(bos, rel=100 * rtol)
        assert st.mean_act == pytest.approx(ref[:, 1:].mean().item(), rel=100 * rtol)
    return n_layers, n_heads, bool(vnorms)
