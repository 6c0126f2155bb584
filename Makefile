# Everything the project needs is installed by these targets, from a fresh clone.
PYTHON ?= python3
# `python -m` would put the working directory first on sys.path, and from the checkout its
# top-level kernels/ (installed as fused_resnet.kernels) would shadow Hugging Face's kernels
# package, which transformers imports. Every recipe, and every Python they start, runs without it.
export PYTHONSAFEPATH := 1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Two locked environments, each in its own virtual environment: the newest torch /
# torchvision / triton that pyproject admits (`make test`) and the oldest (`make
# test-oldest`). constraints/*.in name the intent; constraints/*.txt pin every package the
# test and bench extras pull in, as `make lock` froze them.
CONSTRAINTS := constraints/newest.txt
OLDEST_VENV := .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-stamp
OLDEST_CONSTRAINTS := constraints/oldest.txt
LATEST_VENV := .venv-latest
LOCK_VENV := .venv-lock

.PHONY: install install-oldest test test-oldest test-latest lock suite-torch suite-interpreter test-zoo test-aot test-aot-oldest test-fast test-interpreter demo gpu bench clean

# $(1): the virtual environment, $(2): its lock file. Everything, pip and setuptools
# included, comes at the locked version; the package builds with the venv's setuptools.
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q -c $(2) --upgrade pip setuptools wheel
	$(1)/bin/python -m pip install -q -c $(2) torch torchvision triton
	$(1)/bin/python -m pip install -q -c $(2) --no-build-isolation -e '.[test,bench]'
	touch $(1)/.installed-stamp
endef

# $(1): the intent (constraints/*.in), $(2): the lock file it writes. A clean venv takes
# what the registry serves today within the intent; its `pip freeze` becomes the lock.
define write_lock
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LOCK_VENV)/bin/python -m pip install -q -c $(1) torch torchvision triton
	$(LOCK_VENV)/bin/python -m pip install -q -c $(1) --no-build-isolation '.[test,bench]'
	{ echo "# Written by make lock from $(1) on $$(date -u +%Y-%m-%d): every package make test's"; \
	  echo "# venv installs, at the version CI passed with. Edit $(1), not this file."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude fused-resnet; } > $(2)
	rm -rf $(LOCK_VENV)
endef

# $(1): the virtual environment. Two chains run side by side (the 2-core machine would
# otherwise idle one core through the single-threaded interpreter run), each one's output
# printed whole when it ends: `make gpu SMOKE=1` (every phase at toy sizes, its files
# checked by tests/tools/test_gpu.py) then the PyTorch-path and AOT-compile tests; and the
# Triton kernels through the interpreter in their own process (TRITON_INTERPRET must be
# set before import).
define run_suite
	$(MAKE) --no-print-directory -j2 --output-sync=target suite-torch suite-interpreter SUITE_VENV=$(1)
endef

SUITE_VENV ?= $(VENV)
suite-torch:
	$(MAKE) --no-print-directory gpu SMOKE=1 PYTHON=$(SUITE_VENV)/bin/python OUT=$(SUITE_VENV)/gpu-smoke
	FUSED_RESNET_GPU_SMOKE_OUT=$(SUITE_VENV)/gpu-smoke $(SUITE_VENV)/bin/python -m pytest -q -m "not interpreter and not zoo" tests

suite-interpreter:
	TRITON_INTERPRET=1 $(SUITE_VENV)/bin/python -m pytest -q -m "(interpreter or both) and not zoo" tests

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(call make_venv,$(VENV),$(CONSTRAINTS))

$(OLDEST_STAMP): pyproject.toml $(OLDEST_CONSTRAINTS)
	$(call make_venv,$(OLDEST_VENV),$(OLDEST_CONSTRAINTS))

install: $(STAMP)

install-oldest: $(OLDEST_STAMP)

# The whole suite on the newest combination.
test: $(STAMP)
	$(call run_suite,$(VENV))

# The whole suite on the oldest combination pyproject admits.
test-oldest: $(OLDEST_STAMP)
	$(call run_suite,$(OLDEST_VENV))

# Regenerate both locks from a clean venv each, on purpose (a new torch, a test dependency
# to move); then run make test and make test-oldest before committing them.
lock:
	$(call write_lock,constraints/newest.in,constraints/newest.txt)
	$(call write_lock,constraints/oldest.in,constraints/oldest.txt)

# Not in CI: the whole suite on the newest packages the registry serves today, nothing
# locked but what pyproject admits, so that the next upstream change is found here first.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test,bench]'
	$(LATEST_VENV)/bin/python -m pip freeze --exclude fused-resnet > $(LATEST_VENV)/versions.txt
	$(call run_suite,$(LATEST_VENV))

# convert() over the whole model zoo (timm, torchvision, transformers): parity and the
# count of tails left unfused; make test runs a representative subset (tests marked zoo).
test-zoo: $(STAMP)
	$(BIN)/python -m pytest -q -m "zoo and not interpreter" tests
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "zoo and (interpreter or both)" tests

# The AOT compile test over other configurations than make test's quick set: AOT=conv1x1
# (the 1x1-convolution GEMMs; CI runs it), modules or every; see the README for times.
AOT ?= conv1x1
test-aot: $(STAMP)
	FUSED_RESNET_AOT=$(AOT) $(BIN)/python -m pytest -q tests/kernels/test_aot_compile.py

# The same on the oldest stack (triton 3.6, the GPU machines'): its compiler spills and
# lowers dots differently, so the GEMMs are proven on both.
test-aot-oldest: $(OLDEST_STAMP)
	FUSED_RESNET_AOT=$(AOT) $(OLDEST_VENV)/bin/python -m pytest -q tests/kernels/test_aot_compile.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not interpreter and not aot" tests

test-interpreter: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "interpreter or both" tests

demo: $(STAMP)
	$(BIN)/python -m fused_resnet demo

# The whole GPU verdict on a machine that already has torch, triton, torchvision, pytest and
# matplotlib: the $(PYTHON) given, no virtual environment, nothing downloaded (--no-index).
# Writes $(OUT)/; SMOKE=1 runs every phase at toy sizes on the CPU.
OUT ?= gpu-results
BUDGET_S ?= 540
gpu:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e .
	$(PYTHON) -m fused_resnet gpu --out $(OUT) --budget-s $(BUDGET_S)$(if $(SMOKE), --smoke)

bench: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(LATEST_VENV) $(LOCK_VENV) build *.egg-info .pytest_cache .benchmarks
