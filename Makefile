# The two commands a newcomer needs: `make dev` runs the whole stack, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every test log ends with the slowest tests (the suite must stay under 15 minutes in CI).
PYTEST_ARGS ?= --durations=25

.PHONY: dev test test-fast soak bench bench-cycle lint install clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# requirements.lock pins the production dependencies to the versions the image uses (deploy/lock.py).
$(STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,test]'
	touch $(STAMP)

install: $(STAMP)

dev: $(STAMP)
	$(BIN)/creditflow dev $(ARGS)

test: $(STAMP) browser
	$(BIN)/pytest $(PYTEST_ARGS)

# The browser tests (hosted pages) drive Debian's chromium through Playwright; Playwright's own browser download is
# never used. Installed here when missing (as root, as CI runs; otherwise it says what to run).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "$$CREDITFLOW_CHROMIUM" ] || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else echo "Chromium is missing: run 'sudo apt-get install chromium' (or set CREDITFLOW_CHROMIUM)"; exit 1; fi; }

# Local loop: skip the slow end-to-end / fault-injection tests.
test-fast: $(STAMP) browser
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The money-lifecycle model test at length: at least 10,000 rule steps on the real stack (about half an hour here);
# prints how many steps ran, how many invariant checks passed and how often each rule ran (also in .data/soak.json).
SOAK_EXAMPLES ?= 500
SOAK_STEPS ?= 40
soak: $(STAMP)
	mkdir -p .data
	CREDITFLOW_MODEL_EXAMPLES=$(SOAK_EXAMPLES) CREDITFLOW_MODEL_STEPS=$(SOAK_STEPS) \
	CREDITFLOW_MODEL_REPORT=.data/soak.json $(BIN)/pytest -p no:cacheprovider -o timeout=0 -s -q \
		tests/test_money_model.py $(PYTEST_ARGS)
	cat .data/soak.json; echo

bench: $(STAMP)
	$(BIN)/python bench/metering.py $(ARGS)

bench-cycle: $(STAMP)
	$(BIN)/python bench/billing_cycle.py $(ARGS)

.PHONY: bench-workflows
bench-workflows: $(STAMP)
	$(BIN)/python bench/live_workflows.py $(ARGS)

.PHONY: bench-http
bench-http: $(STAMP)
	$(BIN)/python bench/http_load.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .data
