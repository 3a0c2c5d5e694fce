"""One module per pipeline stage, named after it: read artifacts -> library -> write.

Each module has `run(cfg) -> metrics` and `preflight(cfg)` (the checks that can fail
before anything is written); some also have `check_reusable(cfg)` for `--skip-*`.
`head_explain.pipeline` orders them; `stages/<stage>.py` runs one under DVC.
"""
