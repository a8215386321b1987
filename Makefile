# The two commands of the README: `make train` and `make test`. Both set up .venv first.
# Another Python: `make test PYTHON=python3.12 VENV=.venv312`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed
NPROC ?= 2
CONFIG ?= configs/tiny.yaml
# Test files run in parallel, each whole on one worker (its module fixtures are computed once):
# most tests wait on process start-up, so two workers fill 2 cores (18.6 -> 13.2 min).
TEST_WORKERS ?= 2
# `make test` runs one representative case of each composition matrix (under 20 minutes on 2
# cores); `make test-extended` runs the rest (CI runs both).
TEST_MARKS ?= not extended

.PHONY: train test test-extended install dry-run bench clean

# The interpreter's own path. pyenv's shim for an installed but unselected version (python3.12
# while 3.11 is pyenv's global one) refuses to run; then pyenv is asked among all its versions.
PYTHON_EXE = $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | paste -sd:) pyenv which $(PYTHON) 2>/dev/null)

# The install downloads several GB (torch's CUDA wheels): a dropped connection is resumed by pip,
# and a download that still fails is tried again whole (pip's cache keeps what already arrived).
# (The venv's first pip, before its upgrade, may predate --resume-retries.)
PIP_INSTALL = for attempt in 1 2 3; do \
	  $(PY) -m pip install -q --retries 10 $(1) && break; \
	  test $$attempt = 3 && { echo "pip install failed 3 times: check the network or the registry" >&2; exit 1; }; \
	  echo "pip install failed (attempt $$attempt of 3); trying again in 30 s" >&2; sleep 30; \
	done

$(PY):
	@test -n "$(PYTHON_EXE)" || { echo "PYTHON=$(PYTHON): no such interpreter on PATH or in pyenv" >&2; exit 1; }
	$(PYTHON_EXE) -m venv $(VENV)
	@$(call PIP_INSTALL,--upgrade pip)

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	@$(call PIP_INSTALL,--resume-retries 30 -e ".[dev]")
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/kiln train $(CONFIG) --nproc-per-node $(NPROC) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "$(TEST_MARKS)" $(PYTEST_ARGS)

test-extended: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m extended $(PYTEST_ARGS)

dry-run: $(STAMP)
	$(VENV)/bin/kiln train configs/llama3-8b.yaml --dry-run --world-size 64

bench: $(STAMP)
	$(PY) bench/step_overhead.py

# The GPU check (README, "Checking a GPU machine"): the gpu tests and GPU benchmarks into one
# JSON report, runs/gpu_check.json; without a GPU its CPU-side part. ARGS go to bench/gpu_check.py.
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
