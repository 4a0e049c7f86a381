"""Probe on the GPU: compile seconds per bucket and decode step time of a random-weight model.

python scripts/gpu_probe.py --model random:llama2-7b --max-num-batched-tokens 512
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from paged_jax import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    start = time.perf_counter()
    llm = LLM(
        args.model, max_model_len=1024, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )  # fmt: skip
    print(
        json.dumps(
            {
                "init_s": round(time.perf_counter() - start, 1),
                "load_s": round(llm.load_seconds, 1),
                "buckets": {
                    f"{t}x{s}": round(v, 1) for (t, s), v in llm.runner.warmup_seconds.items()
                },
            }
        )
    )
    rng = np.random.default_rng(0)
    vocab = llm.model_config.vocab_size
    prompts = [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(args.requests)]
    params = SamplingParams(
        temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False
    )
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    decode = [r for r in llm.timeline if r.num_tokens == r.num_seqs]
    step = np.median([r.step_s for r in decode])
    wait = np.median([r.device_wait_s for r in decode])
    print(json.dumps({
        "model": args.model, "requests": args.requests, "seconds": round(seconds, 2),
        "output_tok_s": round(args.requests * args.new_tokens / seconds, 1),
        "decode_steps": len(decode), "decode_step_ms": round(1e3 * step, 2),
        "device_wait_ms": round(1e3 * wait, 2),
        "host_share": round(1 - sum(r.device_wait_s for r in llm.timeline)
                            / sum(r.step_s for r in llm.timeline), 3),
        "stats": llm.stats(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
