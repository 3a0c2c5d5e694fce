"""DVC wiring: dvc.yaml matches the pipeline. Real `dvc repro` and a queued sweep that
reruns only the stages whose params changed: tests/test_dvc_experiments.py."""

from __future__ import annotations

from pathlib import Path

import yaml

from head_explain.pipeline import OUTPUTS, STAGE_PARAMS, STAGES

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_lists_each_stage_params_and_outputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(STAGES)
    for name, st in stages.items():
        assert st["params"] == STAGE_PARAMS[name], name
        outs = [o if isinstance(o, str) else next(iter(o)) for o in st["outs"]]
        for o in OUTPUTS[name]:
            if o != "metrics.json":
                assert f"${{outdir}}/{o}" in outs, (name, o)
        assert Path(REPO / st["cmd"].split()[-1]).exists()
        # per-stage metrics are plain uncached outputs; the headline is the one metric
        assert {f"${{outdir}}/metrics/{name}.json": {"cache": False}} in st["outs"]
        assert ("metrics" in st) == (name == "report")
    assert stages["report"]["metrics"] == [{"${outdir}/metrics.json": {"cache": False}}]
    # select and later stages never read the params that sample and cache read
    assert "topk" not in STAGE_PARAMS["sample"] + STAGE_PARAMS["cache"]
