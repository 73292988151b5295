# Set-up and common tasks. Every target bootstraps .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch build to install when the venv has none (on this project's machines they install from a local copy).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 2

.PHONY: setup test test-slow test-min setup-min lint format bench demo clean gpu-check

# make test-min: ruff and the default suite in a venv of its own on the lowest Python requires-python allows
# (PYENV_VERSION picks pyenv's 3.10), with every dependency at the lower bound pyproject.toml gives it (PyTorch
# from PyPI, about 3 GB), so the ranges say what was tested.
PYTHON_MIN ?= python3.10
VENV_MIN ?= .venv-min
PY_MIN := $(VENV_MIN)/bin/python

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

$(VENV_MIN)/.installed: pyproject.toml
	test -x $(PY_MIN) || PYENV_VERSION=3.10 $(PYTHON_MIN) -m venv $(VENV_MIN)
	$(PY_MIN) tests/test_versions.py --lower-bounds > $(VENV_MIN)/constraints.txt
	$(PY_MIN) -m pip install -c $(VENV_MIN)/constraints.txt -e '.[dev]'
	touch $@

setup-min: $(VENV_MIN)/.installed

lint: setup
	$(VENV)/bin/ruff check spa spa_cli.py tests
	$(VENV)/bin/ruff format --check spa spa_cli.py tests

format: setup
	$(VENV)/bin/ruff check --fix spa spa_cli.py tests
	$(VENV)/bin/ruff format spa spa_cli.py tests

test: lint
	$(PY) -m pytest -m "not slow"

test-min: setup-min
	$(VENV_MIN)/bin/ruff check spa spa_cli.py tests
	$(VENV_MIN)/bin/ruff format --check spa spa_cli.py tests
	$(PY_MIN) -m pytest -m "not slow"

test-slow: setup
	$(PY) -m pytest -m slow

bench: setup
	$(VENV)/bin/spa bench block --rounds 21 --json runs/bench/block.json

demo: setup
	$(VENV)/bin/spa demo

# make gpu-check: spa's GPU check (scripts/gpu_check.sh -> python -m spa.bench.gpu_check) with the machine's own
# python3 (no .venv: GPU machines reach no registry); results.json + summary.md under OUT (default ./gpu_out).
# Copies the carried wheels (timm, pycocotools) from GPU_WHEELS_SRC into .gpu/wheels when that folder exists
# (run it once here, then take .gpu along to the GPU machine). GPU_CHECK_ARGS="--device cpu --small": smoke test.
GPU_WHEELS_SRC ?= ../shared/gpu/wheels
GPU_CHECK_ARGS ?=
gpu-check:
	mkdir -p .gpu/wheels
	if [ -d "$(GPU_WHEELS_SRC)" ]; then cp -f "$(GPU_WHEELS_SRC)"/*.whl .gpu/wheels/; fi
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info .pytest_cache .ruff_cache .hypothesis
