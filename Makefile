# Quick start: `make run` (the whole retraining flow on the embedded defaults) and
# `make test`. Both create .venv on first use and reuse it afterwards.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.PHONY: setup data run test test-fast bench clean

# The pins of pip and torch come from pyproject.toml (tasks/pins.py reads it, standard library only).
$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade $$($(PY) -m tasks.pins pip)
	@# torch alone first: its pinned version is the CPU wheel; asked for with the rest, pip may pick a CUDA build.
	$(PY) -m pip install -q $$($(PY) -m tasks.pins torch)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP)

# The data is tracked by data.dvc and stored in the in-repo DVC remote (dvcstore/).
data: setup
	@test -f data/dates.jsonl || $(VENV)/bin/dvc pull -q data.dvc

run: data
	$(VENV)/bin/ftllm run

test: data
	$(PY) -m pytest

test-fast: data
	$(PY) -m pytest -m "not slow"

clean:
	rm -rf artifacts mlflow.db mlartifacts .prefect .bentoml feedback.db
