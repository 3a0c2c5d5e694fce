"""Entry of `stages/<stage>.py` under DVC: params.yaml -> one stage's runner.

Imports only what every stage needs, so a stage's DVC deps (its import closure) stay
its own: editing the explain runner never reruns the cache stage.
"""

from __future__ import annotations

import sys
from types import ModuleType

from head_explain import config as config_mod
from head_explain.errors import HeadExplainError
from head_explain.logs import setup_logging
from head_explain.runners.common import check_writable, run_stage


def stage_main(runner: ModuleType, params: str = "params.yaml") -> None:
    setup_logging("--verbose" in sys.argv or "-v" in sys.argv)
    try:
        cfg = config_mod.load_params(params)
        check_writable(cfg.outdir)
        runner.preflight(cfg)
        run_stage(runner, cfg)
    except HeadExplainError as exc:
        sys.stderr.write(f"head-explain {runner.STAGE}: error: {exc}\n")
        raise SystemExit(exc.exit_code) from None
