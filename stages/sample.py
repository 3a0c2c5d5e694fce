"""DVC stage 'sample': params.yaml -> head_explain.runners.sample (see dvc.yaml)."""

from head_explain.runners import sample
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(sample)
