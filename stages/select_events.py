"""DVC stage 'select' (named select_events.py: a script select.py would shadow the stdlib module): params.yaml -> head_explain.runners.select (see dvc.yaml)."""

from head_explain.runners import select
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(select)
