"""CPU throughput of the engine on the bundled SmolLM2 (issue: 16 prompts x 64 new tokens).

Prints one JSON line: output tok/s, warmup seconds, compiles after warmup, preemptions and KV
utilization. Compare with ``scripts/bench_hf_generate.py`` run on the same machine.
    python scripts/bench_cpu.py [--prompts 16] [--prompt-len 128] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from paged_jax import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 49152, args.prompt_len).tolist() for _ in range(args.prompts)]
    start = time.perf_counter()
    llm = LLM(
        "smollm2-135m",
        max_model_len=args.prompt_len + args.new_tokens,
        max_num_seqs=args.prompts,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    init_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    stats = llm.stats()
    print(json.dumps({
        "impl": "paged_jax",
        "requests": len(outputs),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "seconds": round(seconds, 3),
        "output_tok_s": round(num_out / seconds, 2),
        "load_s": round(stats["load_seconds"], 2),
        "init_s": round(init_s, 2),
        "warmup_s": round(stats["warmup_seconds"], 2),
        "compiles_after_warmup": stats["compiles_after_warmup"],
        "preemptions": stats["preemptions"],
        "kv_utilization": round(stats["kv_utilization"], 4),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
