"""Time the HF transformers reference on the bundled SmolLM2-135M-Instruct GGUF, on CPU.

Run in the reference venv (torch==2.13.0, transformers, accelerate, gguf), from the repository
root::

    python scripts/bench_hf_forward.py [--tokens 128] [--runs 7] [--threads N]

Measures (1) loading the model from the GGUF with transformers (dequantized to float32), in
seconds, and (2) one dense forward over a ``--tokens``-long prompt (float32, no KV cache, torch
threads = all cores unless ``--threads``), the median of ``--runs`` timed runs after one warmup.
Prints one JSON line:
``{"impl": "hf-transformers", "load_s", "prompt_tokens", "forward_s", "tokens_per_s", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paged_jax.io.bundled import bundled_path  # noqa: E402  (pure stdlib module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads = args.threads
    torch.set_num_threads(threads)

    gguf_path = bundled_path("smollm2-135m")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, args.tokens), generator=gen)
    times = []
    with torch.inference_mode():
        model(ids, use_cache=False)  # warmup
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t0)
    forward_s = statistics.median(times)
    result = {
        "impl": "hf-transformers",
        "load_s": round(load_s, 4),
        "prompt_tokens": args.tokens,
        "forward_s": round(forward_s, 5),
        "tokens_per_s": round(args.tokens / forward_s, 1),
        "runs": args.runs,
        "threads": threads,
        "attn_implementation": model.config._attn_implementation,
        "dtype": "float32",
        "device": "cpu",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
