"""Load time of the bundled SmolLM2 and the dense forward's tokens/s for one prompt (CPU).

Compare with ``scripts/bench_hf_forward.py`` (HF transformers) on the same machine::

    python scripts/bench_forward.py [--tokens 128] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.io.bundled import bundled_path
from paged_jax.io.loader import load_model
from paged_jax.model.dense import dense_logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    bundled_path("smollm2-135m")  # fetch excluded from the load time
    loaded = load_model("smollm2-135m", "float32")
    cfg, params = loaded.config, loaded.params
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.tokens)))
    fwd = jax.jit(lambda p, x: dense_logits(p, cfg, x))
    start = time.perf_counter()
    fwd(params, ids).block_until_ready()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        fwd(params, ids).block_until_ready()
        times.append(time.perf_counter() - start)
    forward_s = statistics.median(times)
    print(json.dumps({
        "impl": "paged_jax-dense",
        "jax": jax.__version__,
        "load_s": round(loaded.load_seconds, 2),
        "compile_s": round(compile_s, 2),
        "prompt_tokens": args.tokens,
        "forward_s": round(forward_s, 4),
        "tokens_per_s": round(args.tokens / forward_s, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
