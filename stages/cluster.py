"""DVC stage 'cluster': params.yaml -> head_explain.pipeline.run_cluster (see dvc.yaml)."""

from head_explain.cli import stage_main

if __name__ == "__main__":
    stage_main("cluster")
