# Quick start: `make run` (the whole retraining flow on the embedded defaults) and
# `make test`. Both create .venv on first use and reuse it afterwards.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The pinned stack resolves on Python 3.11 only (pyproject.toml: requires-python): python3.11
# where it is on PATH, else python3, which must then be 3.11 (`make PYTHON=/path/to/python3.11`).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup data browser run test test-fast lint docs docs-serve clean

# The pins of pip and torch come from pyproject.toml (tasks/pins.py reads it, standard library only).
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
	  echo "error: Python 3.11 is required, and '$(PYTHON)' is $$($(PYTHON) -V 2>&1 || echo missing); install python3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade $$($(PY) -m tasks.pins pip)
	@# torch alone first: its pinned version is the CPU wheel; asked for with the rest, pip may pick a CUDA build.
	$(PY) -m pip install -q $$($(PY) -m tasks.pins torch)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

# The data is tracked by data.dvc and stored in the in-repo DVC remote (dvcstore/).
data: setup
	@test -f data/dates.jsonl -a -f data/tools.jsonl || $(VENV)/bin/dvc pull -q data.dvc

run: data
	$(VENV)/bin/ftllm run

# Headless Chromium (a Debian package) for the browser tests of the offline pages. Installed
# where this runs as root with apt-get; elsewhere those tests skip and say this line.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	  || echo "chromium is not installed (apt-get install -y chromium): the browser tests will skip"

# Everything: the linter, the import layers, the docs site (--strict), then tests/unit,
# tests/integration (DVC, torchrun, servers, HTTP, a browser) and tests/e2e (whole flows).
# pytest-xdist runs the test files in TEST_WORKERS processes, each file whole in one of them
# (its module fixtures are built once), the longest files first (tests/conftest.py). Most
# tests wait on processes and servers part of the time, so three workers keep two cores
# busy where two left them idle a sixth of the time (docs/guides/tests.md).
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 3
test: data browser lint docs
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# ruff (ruff.toml) and the import-layer contract (.importlinter: tasks import none of flows,
# serving or ftllm; flows and serving not each other nor ftllm; no cycles inside a package).
lint: setup
	$(VENV)/bin/ruff check .
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports --no-cache

# The documentation site (mkdocs.yml, docs/): the CLI and settings references are generated
# from the code at build time; --strict fails on a broken link or a warning. Output in site/.
docs: setup
	PYTHONPATH=$(CURDIR) $(VENV)/bin/mkdocs build --strict

docs-serve: setup
	PYTHONPATH=$(CURDIR) $(VENV)/bin/mkdocs serve

# The unit tests only: no subprocess, no server; under two minutes on two cores.
test-fast: data
	$(PY) -m pytest tests/unit

clean:
	rm -rf artifacts mlflow.db mlartifacts .prefect .bentoml feedback.db site
