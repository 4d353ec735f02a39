# One-command workflows. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make run` needs only the service and the simulator, not the development toolchain.
RUN_STAMP := $(VENV)/.installed-run
# make run PORT=8001 SIMULATOR_PORT=8011 when 8000 or 8010 are taken.
PORT ?= 8000
SIMULATOR_PORT ?= 8010

.PHONY: install run test lint bench screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[sim]'
	touch $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/motionhook dev --port $(PORT) --simulator-port $(SIMULATOR_PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m bench

# The README's dashboard screenshots, from a real local stack (needs /usr/bin/chromium).
screenshots: $(STAMP)
	$(BIN)/python -m docs.screenshots

clean:
	rm -rf $(VENV) instance .pytest_cache .mypy_cache .ruff_cache
