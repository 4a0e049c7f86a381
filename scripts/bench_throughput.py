"""End-to-end offline throughput of the engine (the same as ``paged-jax bench``): a synthetic
ShareGPT-like workload (or a JSONL of prompts) on random weights of a real model shape. Writes
JSON, a markdown table and a PNG plot under ``--out``; see ``paged_jax/bench.py``::

    python scripts/bench_throughput.py [--model random:llama2-7b] [--num-requests 1000]
        [--workload sharegpt|shared-prefix] [--prefix-len 80] [--no-prefix-caching]
        [--contiguous] [--config engine.yaml] [--out out/bench] [--tag NAME] [key=value ...]

Baselines on the same card: ``scripts/bench_hf.py`` (HF transformers generate) and this script
with ``--contiguous num_pages=N`` (N from the paged run's JSON: the same KV memory).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
