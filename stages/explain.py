"""DVC stage 'explain': params.yaml -> head_explain.pipeline.run_explain (see dvc.yaml)."""

from head_explain.cli import stage_main

if __name__ == "__main__":
    stage_main("explain")
