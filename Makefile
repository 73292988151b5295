# Set-up and common tasks. Every target bootstraps .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch build to install when the venv has none (on this project's machines they install from a local copy).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 2

.PHONY: setup test test-slow lint format bench demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check spa tests
	$(VENV)/bin/ruff format --check spa tests

format: setup
	$(VENV)/bin/ruff check --fix spa tests
	$(VENV)/bin/ruff format spa tests

test: lint
	$(PY) -m pytest -m "not slow"

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(VENV)/bin/spa bench block --rounds 21 --json runs/bench/block.json

demo: setup
	$(VENV)/bin/spa demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
