"""DVC stage 'explain': params.yaml -> head_explain.runners.explain (see dvc.yaml)."""

from head_explain.runners import explain
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(explain)
