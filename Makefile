# voxflow set-up and common tasks. Every target installs what it needs on first use.
#   make demo   -- the end-to-end demo on the built-in synthetic dataset
#   make test   -- the default (fast) test suite
#   make lint   -- ruff check + ruff format --check (voxflow, tests, benchmarks) and mypy (strict on the core; pyproject.toml [tool.mypy])
#   make test-nnunet -- nnU-Net v2 parity tests in a separate venv (.venv-nnunet) with nnunetv2
#   make test-viewer -- napari opens dataset and prediction stores (own venv .venv-viewer, under xvfb-run;
#                       the Debian packages it needs: see .ci/run)
#   make gpu-check -- every CUDA path (tests marked gpu; they skip without CUDA) + the training benchmark on CUDA
# Choose another torch build with TORCH_SPEC / TORCH_PIP_ARGS, e.g.
#   make demo TORCH_SPEC="torch==2.5.1" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
WORK ?= voxflow_demo
PYTEST_ARGS ?=
BIN := $(VENV)/bin
NNUNET_VENV ?= .venv-nnunet
NNUNET_BIN := $(NNUNET_VENV)/bin
TORCHVISION_SPEC ?= torchvision==0.28.0
VIEWER_VENV ?= .venv-viewer
VIEWER_BIN := $(VIEWER_VENV)/bin
# napari draws with OpenGL, which Qt's offscreen platform lacks: run it on a virtual X display
XVFB ?= $(shell command -v xvfb-run >/dev/null 2>&1 && echo "xvfb-run -a")

.PHONY: setup demo test lint test-slow test-nnunet test-viewer gpu-check bench clean

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

# ruff and mypy come with the `dev` extra
$(BIN)/.voxflow-dev-installed: $(BIN)/.voxflow-installed pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

lint: $(BIN)/.voxflow-dev-installed
	$(BIN)/ruff check voxflow tests benchmarks
	$(BIN)/ruff format --check voxflow tests benchmarks
	$(BIN)/mypy

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# Install a CUDA build first, e.g. make gpu-check TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url ..."
gpu-check: setup
	$(BIN)/python -m pytest -q -s -rs -m gpu tests/gpu $(PYTEST_ARGS)
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && \
	  $(BIN)/python benchmarks/train.py --data ../shared/data/hippocampus-dev --preset default --device cuda \
	    --epochs 3 --iters 50 --num-workers 2 || echo "gpu-check: no CUDA device, benchmark skipped"

# nnunetv2 goes into its own venv (never into $(VENV)); the constraints keep the CPU torch build.
$(NNUNET_BIN)/.voxflow-nnunet-installed: pyproject.toml
	test -x $(NNUNET_BIN)/python || $(PYTHON) -m venv $(NNUNET_VENV)
	$(NNUNET_BIN)/python -m pip install -q --upgrade pip
	$(NNUNET_BIN)/python -c "import torch" 2>/dev/null || $(NNUNET_BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	printf '%s\n%s\n' "$(TORCH_SPEC)" "$(TORCHVISION_SPEC)" > $(NNUNET_VENV)/constraints.txt
	$(NNUNET_BIN)/python -m pip install -q $(TORCH_PIP_ARGS) -e ".[test,nnunet]" nnunetv2 -c $(NNUNET_VENV)/constraints.txt
	touch $@

test-nnunet: $(NNUNET_BIN)/.voxflow-nnunet-installed
	$(NNUNET_BIN)/python -m pytest -q -m nnunet $(PYTEST_ARGS)

# napari + Qt go into their own venv (its pytest plugins stay out of $(VENV)); the constraint keeps torch.
$(VIEWER_BIN)/.voxflow-viewer-installed: pyproject.toml
	test -x $(VIEWER_BIN)/python || $(PYTHON) -m venv $(VIEWER_VENV)
	$(VIEWER_BIN)/python -m pip install -q --upgrade pip
	$(VIEWER_BIN)/python -c "import torch" 2>/dev/null || $(VIEWER_BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	printf '%s\n' "$(TORCH_SPEC)" > $(VIEWER_VENV)/constraints.txt
	$(VIEWER_BIN)/python -m pip install -q $(TORCH_PIP_ARGS) -e ".[viewer]" -c $(VIEWER_VENV)/constraints.txt
	touch $@

test-viewer: $(VIEWER_BIN)/.voxflow-viewer-installed
	$(XVFB) $(VIEWER_BIN)/python -m pytest -q -rs -m viewer $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(WORK) .pytest_cache
