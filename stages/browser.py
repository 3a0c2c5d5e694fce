"""DVC stage 'browser': params.yaml -> head_explain.runners.browser (see dvc.yaml)."""

from head_explain.runners import browser
from head_explain.stage_entry import stage_main

if __name__ == "__main__":
    stage_main(browser)
