#!/usr/bin/env bash
# The `gpu`-marked tests on one CUDA GPU. They are bound by XLA/Triton compiles on the host,
# so pytest-xdist runs them in 4 processes that share the GPU, each allowed a fifth of its
# memory. Extra arguments go to pytest (e.g. `-n 1` for one process, a test file to narrow).
# Without pytest-xdist installed it runs them in one process.
set -euo pipefail
PY=${PY:-python3}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.2}
if "$PY" -c "import xdist" 2>/dev/null; then
  exec "$PY" -m pytest -m gpu -q -n "${GPU_TEST_PROCS:-4}" --dist load --durations=10 "$@"
fi
exec "$PY" -m pytest -m gpu -q --durations=10 "$@"
