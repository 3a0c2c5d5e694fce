"""`--plan`: requests, tokens and dollars of explain + simulate, sent nothing."""

from __future__ import annotations

import json
import os
import socket

import pytest
from helpers import head_explain_command

from head_explain import config
from head_explain.plan import plan


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("plan tried to connect")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_plan_of_the_seed_default_job(tmp_path, monkeypatch, no_network):
    """The schema defaults (gpt2, up to 200 heads, gpt-4o-mini on OpenAI's API): GPT-2
    small has 144 heads; 1 explain request each; for the explanation and its shuffled
    baseline, 5 + 5 per-token simulations and 5 + 5 pair judgements."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # planning needs no key
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    cfg = config.build({"outdir": str(tmp_path / "out"), "llm_cache": str(tmp_path / "c.sqlite")})
    p = plan(cfg)
    explain, simulate = p["stages"]
    assert p["heads"] == 144 and explain["requests"] == 144 and simulate["requests"] == 5760
    assert simulate["method"] == "chat" and explain["estimated"] and explain["cached"] == 0
    assert 0 < explain["cost_usd"] < simulate["cost_usd"] and p["total_usd"] > 0.1
    assert explain["completion_tokens"] == 144 * cfg.explain_max_tokens  # an upper bound
    # 5 excerpts a request: 2 simulation requests per explanation instead of 10
    batched = plan(config.build({**cfg_dict(tmp_path), "excerpts_per_request": 5}))
    assert batched["stages"][1]["requests"] == 144 * 2 * (2 + 10)
    assert batched["stages"][1]["prompt_tokens"] < simulate["prompt_tokens"]


def cfg_dict(tmp_path) -> dict:
    return {"outdir": str(tmp_path / "out"), "llm_cache": str(tmp_path / "c.sqlite")}


@pytest.mark.slow
def test_cli_plan_prints_and_writes_plan_json(tmp_path):
    import subprocess

    out = tmp_path / "out"
    proc = subprocess.run(
        [*head_explain_command(), "--plan", "--outdir", str(out), "--llm-cache", "off",
         "--heads", "L0H1,L1H2", "--model", "smollm2-135m-instruct"],
        capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
             "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "explain" in proc.stdout and "nothing was sent" in proc.stdout
    p = json.loads((out / "plan.json").read_text())
    assert p["heads"] == 2 and [s["requests"] for s in p["stages"]] == [2, 80]
