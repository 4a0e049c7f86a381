"""Probe: does calling the compiled step block the host until the GPU is done?

Times the call (return) and the result (ready) of one decode bucket, with host numpy inputs
and with inputs already on the device.
    python scripts/gpu_dispatch_probe.py [--model random:llama-1b]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from paged_jax import LLM, SamplingParams
from paged_jax.runtime.pack import pack
from paged_jax.runtime.runner import _as_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-1b")
    args = ap.parse_args()
    llm = LLM(args.model, max_model_len=512, max_num_seqs=64, max_num_batched_tokens=64,
              warmup=False)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True, detokenize=False)
    for _ in range(64):
        llm.scheduler.add(llm._make_request([1, 2, 3, 4] * 16, params).seq)
    for _ in range(4):  # prefill, then decode steps
        plan = llm.scheduler.schedule()
        llm.scheduler.update(plan, llm.runner.run(plan).tolist())
    plan = llm.scheduler.schedule()
    runner = llm.runner
    bucket = runner.buckets.pick_bucket(plan.num_tokens, plan.num_seqs)
    exe = runner._executables[bucket]
    host = _as_dict(
        pack(
            plan,
            num_tokens_bucket=bucket[0],
            num_seqs_bucket=bucket[1],
            page_size=runner.page_size,
            max_pages_per_seq=runner.max_pages_per_seq,
        )
    )
    results = {}
    for name in ("numpy", "device", "numpy", "device"):
        inputs = host if name == "numpy" else jax.device_put(host)
        jax.block_until_ready(inputs)
        calls, readies = [], []
        for _ in range(10):
            t0 = time.perf_counter()
            runner.kv, sampled = exe(runner.params, runner.kv, inputs)
            t1 = time.perf_counter()
            sampled.block_until_ready()
            t2 = time.perf_counter()
            calls.append(t1 - t0)
            readies.append(t2 - t0)
        results[name] = {
            "call_ms": round(1e3 * float(np.median(calls)), 3),
            "ready_ms": round(1e3 * float(np.median(readies)), 3),
        }
    print(json.dumps({"model": args.model, "bucket": bucket, **results}))


if __name__ == "__main__":
    main()
