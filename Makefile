# Two entry points a newcomer needs: `make demo` and `make test`.
# Both create or update .venv first (only when pyproject.toml changed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.presso-installed
PYTEST_ARGS ?=

.PHONY: demo test lint coverage clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m presso.demo demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

coverage: $(STAMP)
	$(BIN)/python benchmarks/coverage.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
