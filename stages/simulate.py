"""DVC stage 'simulate': params.yaml -> head_explain.runners.simulate (see dvc.yaml)."""

from head_explain.runners import simulate
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(simulate)
