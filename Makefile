# Two commands on a fresh machine with Python >= 3.11 and make: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-gpu lint format clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "paged_jax needs Python >= 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

run: $(VENV)/.installed
	$(VENV)/bin/paged-jax generate --config configs/smollm2-135m.yaml \
		--input examples/prompts.jsonl --output out/prompts.out.jsonl --print

# Two pytest-xdist processes (CI has 2 cores), a test module per process so that its
# module-scoped engines are built once; TEST_PROCS=0 runs them in this process.
TEST_PROCS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_PROCS) --dist loadfile

# On a CUDA machine: the `gpu`-marked tests, 4 processes sharing the GPU (they are compile-bound).
test-gpu: $(VENV)/.installed
	PY=$(PY) scripts/test_gpu.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check paged_jax tests scripts
	$(VENV)/bin/ruff format --check paged_jax tests scripts

format: $(VENV)/.installed
	$(VENV)/bin/ruff format paged_jax tests scripts

clean:
	rm -rf $(VENV) out
