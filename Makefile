# voxflow set-up and common tasks. Every target installs what it needs on first use.
#   make demo   -- the end-to-end demo on the built-in synthetic dataset
#   make test   -- the default (fast) test suite
# Choose another torch build with TORCH_SPEC / TORCH_PIP_ARGS, e.g.
#   make demo TORCH_SPEC="torch==2.5.1" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
WORK ?= voxflow_demo
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow bench clean

$(BIN)/.voxflow-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.voxflow-installed

demo: setup
	$(BIN)/voxflow demo --work $(WORK)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(WORK) .pytest_cache
