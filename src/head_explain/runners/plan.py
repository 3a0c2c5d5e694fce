"""Step 'plan' (not a pipeline stage): what explain + simulate would cost, sent nothing.

Run by `head-explain --plan` or, beside DVC, `python stages/plan.py` (params.yaml).
Not a stage of dvc.yaml on purpose: its answer depends on the LLM cache, which DVC
does not track, so as a stage it would be stale after every run; and a plan must be
readable before `dvc repro` spends anything. Writes outputs/plan.json.
"""

from __future__ import annotations

from typing import Any

from head_explain import artifacts as art
from head_explain.config import Config
from head_explain.runners.common import out

STAGE = "plan"


def preflight(cfg: Config) -> None:
    """Nothing to check: planning needs no key, no server and no model weights."""


def run(cfg: Config) -> dict[str, Any]:
    from head_explain.plan import format_plan, plan

    p = plan(cfg)
    print(format_plan(p))
    art.write_json(out(cfg, "plan.json"), p)
    return {"total_usd": p["total_usd"], "heads": p["heads"], "tokens_by": p["tokens_by"],
            **{f"{s['stage']}_requests": s["requests"] - s["cached"] for s in p["stages"]}}  # fmt: skip
