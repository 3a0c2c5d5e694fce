"""DVC stage 'cache': params.yaml -> head_explain.pipeline.run_cache (see dvc.yaml)."""

from head_explain.cli import stage_main

if __name__ == "__main__":
    stage_main("cache")
