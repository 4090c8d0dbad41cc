# fedseg — the two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The torch requirement, installed before fedseg. From PyPI (the default index) on Linux x86_64
# this is a CUDA build (it also runs on a CPU, but downloads several GB of CUDA libraries); on
# macOS and Windows it is a CPU build.
TORCH ?= torch==2.13.0
# The package index to take torch from, given separately so that it never ends up inside the
# requirement: empty = PyPI. CPU only: https://download.pytorch.org/whl/cpu;
# a given CUDA version: https://download.pytorch.org/whl/cu128 (see pytorch.org).
TORCH_INDEX ?=
BIN := $(VENV)/bin
DEMO_DIR ?= demo_run

.PHONY: venv install install-test test test-slow demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, from TORCH_INDEX when given, so `pip install -e .` keeps that build.
	$(BIN)/pip install "$(TORCH)" $(if $(strip $(TORCH_INDEX)),--index-url "$(strip $(TORCH_INDEX))")

venv: $(BIN)/python

install: venv
	$(BIN)/pip install -e .

install-test: venv
	$(BIN)/pip install -e ".[test]"

# lint-imports: the layer and independence contracts of pyproject.toml (docs/architecture.md)
test: install-test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

demo: install
	bash scripts/demo.sh $(BIN)/fedseg $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
