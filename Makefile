# biasamp — common tasks. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: help install test test-slow test-gpu lint quickstart clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install:  ## create .venv and install biasamp (editable) with the dev extras
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"

test:  ## the default test suite (fast CPU tests)
	WANDB_MODE=disabled $(PY) -m pytest

test-slow:  ## also the slow CPU tests
	WANDB_MODE=disabled $(PY) -m pytest -m "not gpu"

test-gpu:  ## the GPU tests (needs CUDA)
	WANDB_MODE=disabled $(PY) -m pytest -m gpu

lint:  ## ruff
	$(VENV)/bin/ruff check src tests

quickstart:  ## train the tiny model on the embedded Biased MNIST (CPU, a few minutes)
	$(PY) -m biasamp.train experiment=quickstart

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf runs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
