# All set-up goes through here: `make train` and `make test` work on a fresh machine.
# `make train` installs what training needs; the test, bench and lint targets add the `dev`
# (pytest, ruff), `hf` (torch, transformers: the Hugging Face parity tests and the bench's
# peer) and `tokamax` (the moe.grouped_matmul=tokamax kernel and its tests) extras. Each
# install has its own stamp, so neither redoes the other's.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  := $(VENV)/.installed-extras
WORKDIR ?= runs/small

.PHONY: install install-extras train test test-fast bench lint format clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(EXTRAS): pyproject.toml $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,hf,tokamax]'
	touch $(EXTRAS)

install: $(STAMP)

install-extras: $(EXTRAS)

# Train the default `small` MoE on the embedded corpus, then evaluate and sample from it.
train: install
	$(BIN)/sparsemodel train --config small --workdir $(WORKDIR)
	$(BIN)/sparsemodel eval --workdir $(WORKDIR)
	$(BIN)/sparsemodel generate --workdir $(WORKDIR) --prompt 'def main(' --max-new-tokens 200

# One pytest worker per core, up to 4: most tests wait on compiles and subprocesses.
PYTEST := $(BIN)/pytest -q -n auto --maxprocesses 4

test: install-extras
	$(PYTEST)

test-fast: install-extras
	$(PYTEST) -m 'not slow'

# Ratios measured in one run (MoE vs dense step and layer, expert scaling, FLOPs, MFU, decode).
bench: install-extras
	$(BIN)/python experiments/bench.py

# The five experiments on what sparse activation and parameter sharing buy at equal compute
# (~80 min on two shared CPU cores; results and plots in experiments/results/, runs in
# experiments/runs/).
.PHONY: experiments
experiments: install
	$(BIN)/python experiments/dense_vs_moe.py
	$(BIN)/python experiments/num_experts.py
	$(BIN)/python experiments/routing.py
	$(BIN)/python experiments/sharing.py
	$(BIN)/python experiments/overfitting.py

# The scaling study (experiments/README.md, "The scaling study"): ~6.5 h on two CPU cores.
# Stop it at any time (Ctrl-C checkpoints the run in progress) and run it again: finished
# runs (experiments/results/study/*.json) are skipped, a stopped one resumes. Then the step
# times of shapes not yet measured at this commit (alternating) and the report.
.PHONY: study
study: install
	$(BIN)/python experiments/study.py
	$(BIN)/python experiments/study.py --calibrate
	$(BIN)/python experiments/study_report.py

lint: install-extras
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-extras
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
