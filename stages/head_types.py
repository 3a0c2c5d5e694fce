"""DVC stage 'head_types': params.yaml -> head_explain.pipeline.run_head_types (see dvc.yaml)."""

from head_explain.cli import stage_main

if __name__ == "__main__":
    stage_main("head_types")
