# biasamp — common tasks. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     ?= $(VENV)/bin/python
OUT    ?= runs
SMOKE  ?= 0
SEEDS  ?= 1

.PHONY: help install test test-slow test-gpu lint quickstart clean \
	paper-bmnist paper-bmnist-2class paper-steps paper-guidance paper-multicolor mitigation-balancing mitigation-invdiff

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-20s %s\n", $$1, $$2}'

install:  ## create .venv and install biasamp (editable) with the dev extras
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"

# the CPU tests run in parallel (pytest-xdist), one worker per core up to 4, idle workers taking queued tests from
# busy ones (worksteal: test times range from milliseconds to minutes); most tests spend their time in
# single-threaded subprocesses, so 2 cores halve the wall time
# (a venv made before pytest-xdist joined the dev extras runs them in one process until `make install`)
XDIST ?= $(shell $(PY) -c "import xdist" 2>/dev/null && echo "-n auto --maxprocesses=4 --dist worksteal")

test:  ## the default test suite (fast CPU tests)
	WANDB_MODE=disabled $(PY) -m pytest $(XDIST)

test-slow:  ## also the slow CPU tests
	WANDB_MODE=disabled $(PY) -m pytest $(XDIST) -m "not gpu"

test-gpu:  ## the GPU tests (needs CUDA)
	WANDB_MODE=disabled $(PY) -m pytest -m gpu

lint:  ## ruff
	$(VENV)/bin/ruff check src tests

quickstart:  ## train -> count -> report on the embedded Biased MNIST (CPU, about 7 min; SEEDS=3: 3 seeds, about 11)
	SEEDS=$(SEEDS) PY=$(PY) OUT=$(OUT) bash experiments/quickstart/run.sh

paper-bmnist:  ## 10-class Biased MNIST, rho_data 0.3..0.999 x (steps, churn) (GPU; SMOKE=1: tiny CPU run)
	SMOKE=$(SMOKE) PY=$(PY) OUT=$(if $(filter 1,$(SMOKE)),$(OUT)/smoke,$(OUT)) bash experiments/paper-bmnist/run.sh

paper-bmnist-2class:  ## 2-class Biased MNIST, training-set size x churn (GPU; SMOKE=1: tiny CPU run)
	SMOKE=$(SMOKE) PY=$(PY) OUT=$(if $(filter 1,$(SMOKE)),$(OUT)/smoke,$(OUT)) bash experiments/paper-bmnist-2class/run.sh

paper-steps:  ## steps 6..500, Heun vs Euler, churn 0/60 (GPU; SMOKE=1: tiny CPU run)
	SMOKE=$(SMOKE) PY=$(PY) OUT=$(if $(filter 1,$(SMOKE)),$(OUT)/smoke,$(OUT)) bash experiments/paper-steps/run.sh

paper-guidance:  ## guidance w in {0 .. 10} (GPU; SMOKE=1: tiny CPU run)
	SMOKE=$(SMOKE) PY=$(PY) OUT=$(if $(filter 1,$(SMOKE)),$(OUT)/smoke,$(OUT)) bash experiments/paper-guidance/run.sh

paper-multicolor:  ## Multi-Color MNIST, left/right rho in {0.95, 0.99} x guidance (GPU; SMOKE=1: tiny CPU run)
	SMOKE=$(SMOKE) PY=$(PY) OUT=$(if $(filter 1,$(SMOKE)),$(OUT)/smoke,$(OUT)) bash experiments/paper-multicolor/run.sh

mitigation-balancing:  ## Balancing Act: h-space heads + distribution guidance on the quick-start model (CPU, about 35 min; SMOKE=1: tiny)
	SMOKE=$(SMOKE) PY=$(PY) OUT=$(if $(filter 1,$(SMOKE)),$(OUT)/smoke,$(OUT)) bash experiments/mitigation-balancing/run.sh

mitigation-invdiff:  ## InvDiff: label-free groups + side-network fine-tuning on a rho 0.95 quick-start model (CPU, about 20 min; SMOKE=1: tiny)
	SMOKE=$(SMOKE) PY=$(PY) OUT=$(if $(filter 1,$(SMOKE)),$(OUT)/smoke,$(OUT)) bash experiments/mitigation-invdiff/run.sh

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf runs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
