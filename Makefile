# The README's quickstart: `make run` (main job) and `make test` (the core test suite, light
# install); `make test-all` installs everything and runs every test; CI (.ci/run) installs
# everything and runs `make test-all`; `make docs` builds the documentation site into docs/_build/html.
# Each target creates .venv if needed and installs what it needs, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: run test test-all lint bench clean package-check aot-venv-cuda aot-venv-tpu aot-venvs aot-tables docs

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.experiments: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[experiments]'
	touch $@

$(VENV)/.test: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[test]'
	touch $@

$(VENV)/.test-all: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[test-all]'
	touch $@ $(VENV)/.test

$(VENV)/.docs: $(VENV)/bin/python pyproject.toml
	$(PIP) install -e '.[docs]'
	touch $@

run: $(VENV)/.experiments
	$(PY) -m experiments.train --config digits --workdir workdirs/digits

# Three xdist workers on two cores: the third fills the time the others wait on subprocesses,
# checkpoint writes and collectives (results/test_suite.md: the runs side by side).
# The core suite: tests marked slow are deselected; tests needing torch, timm, TensorFlow, DALI,
# MemCNN or transformers skip with the reason (`make test-all` installs and runs them).
test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 3 --dist worksteal -m "not slow"

test-all: $(VENV)/.test-all
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 3 --dist worksteal

# The package as users get it: sdist and wheel built in isolation, the wheel (not editable)
# installed in a clean venv with its dependencies plus grain (`python -m revjax.prepare` reads
# revjax.data), then used from outside the source tree (.ci/wheel_smoke.py). CI runs this.
WHEEL_VENV := build/wheel-venv
package-check: $(VENV)/.test
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m build --outdir dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --disable-pip-version-check --no-compile -q \
		dist/revjax-*.whl grain
	cd build && wheel-venv/bin/python ../.ci/wheel_smoke.py
	cd build && wheel-venv/bin/python -m revjax.prepare --help > /dev/null
	cd build && wheel-venv/bin/revjax-prepare --help > /dev/null
	@echo "package-check: sdist + wheel built, wheel installed and used in a clean venv"

# The documentation site, offline: warnings are errors, every broken reference fails the build;
# notebooks are rendered as committed (the test suite executes them).
docs: $(VENV)/.docs
	$(PY) -m sphinx -b html -W --keep-going -n docs docs/_build/html
	@echo "docs: open docs/_build/html/index.html"

bench: $(VENV)/.experiments
	$(PY) -m experiments.bench_core

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist docs/_build docs/_generated docs/api/generated

# Ahead-of-time compilation for GPU / TPU targets (experiments/aot/): one venv per plugin,
# jax pinned to the main venv's version. Not part of `make test` (CI never downloads them).
AOT_JAX = $(shell $(PY) -c "import jax; print(jax.__version__)" 2>/dev/null)
AOT_PIN = $(if $(AOT_JAX),==$(AOT_JAX))

.venv-aot-cuda/bin/python .venv-aot-tpu/bin/python:
	$(PYTHON) -m venv $(dir $(@D))

# One each: `make aot-venv-cuda` (~5.6 GB on disk) or `make aot-venv-tpu` (~1.5 GB);
# `aot-venvs`: both.
aot-venv-cuda: $(VENV)/.experiments .venv-aot-cuda/bin/python
	.venv-aot-cuda/bin/python -m pip install -e . 'jax[cuda12]$(AOT_PIN)'

aot-venv-tpu: $(VENV)/.experiments .venv-aot-tpu/bin/python
	.venv-aot-tpu/bin/python -m pip install -e . 'jax[tpu]$(AOT_PIN)'

aot-venvs: aot-venv-cuda aot-venv-tpu

# The committed GPU/TPU tables in results/ (compiles only; ~1-2 h on 2 busy cores).
aot-tables: aot-venvs
	PYTHON=$(PY) bash experiments/aot_tables.sh
