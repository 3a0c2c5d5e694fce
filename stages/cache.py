"""DVC stage 'cache': params.yaml -> head_explain.runners.cache (see dvc.yaml)."""

from head_explain.runners import cache
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(cache)
