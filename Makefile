# Set-up and entry points. Every target creates .venv and installs what is missing first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test train sampler lint bench clean

$(STAMP): pyproject.toml
	@bash .ci/setup.sh
	@touch $(STAMP)

setup: $(STAMP)

# one single-threaded worker per core (pytest-xdist), the slow tests handed out first come first
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .

# The main job; pass overrides with ARGS="preset=tiny data.verify=false ...".
train: $(STAMP)
	$(BIN)/python train.py flow=g_residual data=cifar10 $(ARGS)

# Offline first run: trains the lattice sampler (no data to download) and writes its report and plots.
sampler: $(STAMP)
	$(BIN)/python train.py data=phi4 data.preset=E1 trainer.steps=800 $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_residual_block.py
	$(BIN)/python benchmarks/bench_butterfly.py

clean:
	rm -rf $(VENV)
