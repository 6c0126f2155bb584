# Everything the project needs is installed by these targets, from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch 2.14.1 / torchvision 0.29.1 / triton 3.8.0 is the tested combination.
PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast test-interpreter demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

# The whole suite: PyTorch-path and AOT-compile tests, then the Triton kernels through
# the interpreter in their own process (TRITON_INTERPRET must be set before import).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not interpreter" tests
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "interpreter or both" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not interpreter and not aot" tests

test-interpreter: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "interpreter or both" tests

demo: $(STAMP)
	$(BIN)/python -m fused_resnet demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
