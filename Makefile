# The README's quickstart: `make run` (main job) and `make test` (the test suite).
# Each target creates .venv if needed and installs what it needs, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: run test lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.experiments: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[experiments]'
	touch $@

$(VENV)/.test: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[test]'
	touch $@

run: $(VENV)/.experiments
	$(PY) -m experiments.train --config digits --workdir workdirs/digits

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2

bench: $(VENV)/.experiments
	$(PY) -m experiments.bench_core

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
