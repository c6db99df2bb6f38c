# cargohold: `make test` and `make demo` set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: all venv test fuzz crash demo bench lint proto clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	sh scripts/install-system-deps.sh test
	$(BIN)/pytest $(PYTEST_ARGS)

# The property tests of tests/test_fuzz.py with many examples (make test runs a short pass of the same).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -q -p no:cacheprovider tests/test_fuzz.py

# tests/test_crash.py with 40 kill points per command (20 SIGKILL, 20 SIGTERM; half by time, half by progress
# events); make test runs 5 per command. About 10 minutes on an idle 2-core machine.
crash: $(STAMP)
	sh scripts/install-system-deps.sh test
	CARGOHOLD_CRASH_POINTS=40 $(BIN)/pytest -q -p no:cacheprovider tests/test_crash.py

demo: $(STAMP)
	sh scripts/install-system-deps.sh demo
	$(BIN)/python -m cargohold.devtools.demo

# Every scenario, 5 alternating runs each on fresh ext4 filesystems, every run checked; writes bench/results/
# (results.md, results.json, chart.png). Long (build the huge image, ~40 minutes on 2 cores): for development
# `make bench BENCH_ARGS=--quick` (small images, 2 runs, results in a temp dir). Options: --help.
BENCH_ARGS ?=
bench: $(STAMP)
	sh scripts/install-system-deps.sh bench
	$(BIN)/python -m compileall -q src  # bytecode, as an installed package has it (PYTHONDONTWRITEBYTECODE may be set)
	$(BIN)/python -m cargohold.devtools.bench $(BENCH_ARGS)

proto: $(STAMP)
	sh scripts/gen-proto.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
