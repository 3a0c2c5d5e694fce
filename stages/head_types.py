"""DVC stage 'head_types': params.yaml -> head_explain.runners.head_types (see dvc.yaml)."""

from head_explain.runners import head_types
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(head_types)
