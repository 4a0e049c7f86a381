"""HF transformers ``generate`` on CPU, batched, on the bundled SmolLM2: the baseline for
``scripts/bench_cpu.py`` (same prompt shapes: random token ids, greedy, fixed new tokens).

Run in the reference venv (torch==2.13.0, transformers, accelerate, gguf)::

    python scripts/bench_hf_generate.py [--prompts 16] [--prompt-len 128] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax.io.bundled import bundled_path  # noqa: E402  (pure stdlib module)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = bundled_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    rng = np.random.default_rng(0)  # the same prompts as scripts/bench_cpu.py
    ids = torch.tensor(rng.integers(3, 49152, (args.prompts, args.prompt_len)))
    kwargs = dict(
        do_sample=False,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        pad_token_id=0,
    )
    with torch.inference_mode():
        warm = {**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), **warm)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        seconds = time.perf_counter() - start
    num_out = (out.shape[1] - args.prompt_len) * args.prompts
    print(json.dumps({
        "impl": "hf-transformers-generate",
        "requests": args.prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "seconds": round(seconds, 3),
        "output_tok_s": round(num_out / seconds, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
