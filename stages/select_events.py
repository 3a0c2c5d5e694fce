"""DVC stage 'select' (named select_events.py: a file select.py would shadow the stdlib module): params.yaml -> head_explain.pipeline.run_select (see dvc.yaml)."""

from head_explain.cli import stage_main

if __name__ == "__main__":
    stage_main("select")
