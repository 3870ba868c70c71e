# Two commands from a fresh clone: `make demo` and `make test`. Both build .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# STAMP: the package and what it needs at run time; TEST_STAMP: + the test extras (pytest, hypothesis, TRL, Ray)
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench base setup clean

setup: $(TEST_STAMP)

# On a machine without an NVIDIA GPU, torch 2.13.0 (CPU wheel) goes in first and pinned; everything else
# is then installed under constraints-cpu.txt so nothing can pull a CUDA build. `make demo` needs only the package;
# `make test` adds the test extras on top (the demo's install is a minute or two shorter without them).
$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q -e .; \
	else \
		$(BIN)/pip install -q torch==2.13.0 && \
		$(BIN)/pip install -q -c constraints-cpu.txt -e .; \
	fi
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q -e ".[test]"; \
	else \
		$(BIN)/pip install -q -c constraints-cpu.txt -e ".[test]"; \
	fi
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/retain demo

# The report's browser test needs Debian's chromium; installed here when missing and we may (root, apt).
test: $(TEST_STAMP)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the browser test will be skipped"; }
	$(BIN)/python -m pytest -q

# the bench compares against TRL (a test extra) and lm-evaluation-harness (the lmeval extra): every row runs
$(BENCH_STAMP): $(TEST_STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q -e ".[test,lmeval]"; \
	else \
		$(BIN)/pip install -q -c constraints-cpu.txt -e ".[test,lmeval]"; \
	fi
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py

# Rebuild the embedded base model shipped in src/retain/embedded/base (deterministic for the seed and thread count):
# phase 1 from scratch (about an hour on 2 cores), then the sort phase on top of it (about 11 minutes; the shipped
# phase 2 ran on one thread, so it is rerun on one).
base: $(STAMP)
	$(BIN)/retain pretrain --out runs/base-phase1
	OMP_NUM_THREADS=1 $(BIN)/retain pretrain --phase sort --init runs/base-phase1 --out src/retain/embedded/base

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist src/*.egg-info
