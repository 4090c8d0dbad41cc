# fedseg — the two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= demo_run

.PHONY: venv install install-test test test-slow demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first, pinned to the CPU build, so nothing below pulls a CUDA build.
	$(BIN)/pip install "$(TORCH)"

venv: $(BIN)/python

install: venv
	$(BIN)/pip install -e .

install-test: venv
	$(BIN)/pip install -e ".[test]"

test: install-test
	$(BIN)/python -m pytest -q

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

demo: install
	bash scripts/demo.sh $(BIN)/fedseg $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info
