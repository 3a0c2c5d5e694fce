"""DVC stage 'report': params.yaml -> head_explain.runners.report (see dvc.yaml)."""

from head_explain.runners import report
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(report)
