"""DVC stage 'cluster': params.yaml -> head_explain.runners.cluster (see dvc.yaml)."""

from head_explain.runners import cluster
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(cluster)
