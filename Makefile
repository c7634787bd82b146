# Two entry points a newcomer needs: `make demo` and `make test`.
# Both create or update .venv first (only when pyproject.toml changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.presso-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint coverage clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The tests also cover the optional ecosystems (presso[yolo]: Ultralytics models); the demo needs none of them.
EXTRAS := $(VENV)/.presso-extras-installed
$(EXTRAS): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,yolo,hf,litert]"
	touch $(EXTRAS)

# presso run on the built-in digits (src/presso/demo.py): trains, prunes, recovers, quantizes, measures the original
# and the compressed model side by side and delivers the fastest within the accuracy bound; ~80 s on 2 idle cores.
demo: $(STAMP)
	$(BIN)/python -m presso.demo demo-out

# Tests that compare measured latencies run alone after the parallel run, so no other test skews their timings
# (exit code 5: PYTEST_ARGS selected none of them).
test: $(EXTRAS)
	$(BIN)/python -m pytest -q -n auto --durations=15 -m "not timing" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -p no:xdist -m timing $(PYTEST_ARGS) || [ $$? -eq 5 ]

# Everyday tier, under 3 minutes on 2 cores: everything but the zoo sweeps, the timing tests and the slow tests
# listed in tests/conftest.py.
test-fast: $(EXTRAS)
	$(BIN)/python -m pytest -q -n auto -m "not timing and not zoo and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

coverage: $(STAMP)
	$(BIN)/python benchmarks/coverage.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
