# One-word entries. `make quickstart` runs the whole pipeline on CPU, offline; `make test` runs the tests
# (about 20 minutes on an idle 2-core machine, 24 loaded); `make test-fast` leaves out the slow ones.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# `dvc plots show` pages with the Vega scripts inline (scripts/offline_plots.py, npm)
PLOTS_PAGE := build/dvc_plots/page.html

.PHONY: setup quickstart test test-fast bench lint clean-venv

setup: $(VENV)/.installed $(PLOTS_PAGE)

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

$(PLOTS_PAGE): web/package.json web/package-lock.json web/plots_page.html scripts/offline_plots.py | $(VENV)/.installed
	$(BIN)/python scripts/offline_plots.py

quickstart: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pipelines.quickstart

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

test-fast: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow"

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest tests/benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds

lint: setup
	$(BIN)/ruff check infinito pipelines tests
	$(BIN)/ruff format --check infinito pipelines tests
	$(BIN)/hadolint Dockerfile

clean-venv:
	rm -rf $(VENV)
