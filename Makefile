# equiray: the two commands of the README.
#   make demo   set everything up, then run the main job (`equiray demo`)
#   make test       set everything up, then run the test suite without the long cluster tests (~12 min here)
#   make test-all   the same with the long ones too (own clusters, lost nodes, the autoscaler): what CI runs
# Each step is skipped when already done; `make clean` removes the virtualenv and the demo's outputs.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# torch/torchvision are pinned to the builds this project is developed against (they install from the local
# wheel cache on the project's machines); override TORCH_SPEC for another CUDA/CPU build.
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
FMNIST_DIR  := /usr/share/datasets/fashion-mnist
STAMP       := $(VENV)/.equiray-installed
PYTEST_ARGS ?=

.PHONY: demo test test-all setup data bench-setup clean help

help:
	@echo "make demo   - set up and run the demo (equiray demo)"
	@echo "make test   - set up and run the tests, the long cluster tests left out (pytest -m 'not long')"
	@echo "make test-all - set up and run every test, the long ones too (what CI runs)"
	@echo "make bench-setup - install the benchmarks' peers (equiadapt, torchensemble, nfn) and load generator"
	@echo "make clean  - remove .venv, data/, reports/, runs/, mlflow.db"

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed: install it with 'apt-get install -y python3-venv'"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Fashion-MNIST from Debian's package where apt is available; otherwise `equiray` falls back to torchvision's
# download (set EQUIRAY_DOWNLOAD=1 / --download).
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist (apt)"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
	  echo "warning: could not install dataset-fashion-mnist; the demo will try torchvision's download"; \
	else echo "note: no apt (or not root); the demo will try torchvision's download of Fashion-MNIST"; fi

demo: setup
	$(BIN)/equiray demo $(if $(wildcard $(FMNIST_DIR)/train-images-idx3-ubyte.gz),,--set pretrain.data.download=true)

test: setup
	$(BIN)/python -m pytest -m "not long" $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The peers BENCHMARKS.md runs against. escnn (equiadapt's networks) goes in without its dependencies: one of them,
# py3nj, needs a Fortran compiler to build, and only escnn's 3D groups use it (equiadapt's image canonicalizers run
# on the 2D ones).
bench-setup: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m pip install --quiet --no-deps escnn
	@$(BIN)/python -c "import equiadapt, escnn, torchensemble" && echo "benchmark peers installed"
	@command -v hey >/dev/null || apt-get install -y hey || sudo apt-get install -y hey || { \
	  echo "bench_serve.py needs the load generator hey: apt-get install hey"; exit 1; }

clean:
	rm -rf $(VENV) data reports runs mlflow.db mlartifacts .cache .pytest_cache
