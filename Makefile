# The two commands a newcomer needs: `make dev` runs the whole stack, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test test-fast bench bench-cycle lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/creditflow dev $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Local loop: skip the slow end-to-end / fault-injection tests.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/metering.py $(ARGS)

bench-cycle: $(STAMP)
	$(BIN)/python bench/billing_cycle.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .data
