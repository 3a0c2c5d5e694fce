"""`python stages/plan.py`: the LLM cost of explain + simulate under params.yaml, sent
nothing (see head_explain.runners.plan; deliberately not a dvc.yaml stage)."""

from head_explain.runners import plan
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(plan)
