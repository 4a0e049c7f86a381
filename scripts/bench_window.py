"""What a sliding window and a soft cap cost in the GPU kernel, and what routing windowed prefill
away from the Hopper (Mosaic GPU) path costs (issue 16; run on the GPU, e.g. the H200).

Gemma 3 shapes (bf16, head_dim 256, 4 q heads over 1 kv head per sequence shard; ``--hq/--hkv``
change it). For each case (a decode batch and a prefill chunk at a long context) it times, in
one run and interleaved (``scripts/bench_kernel.time_interleaved``):

* ``full``: no window (prefill: the Hopper path where it applies, as dispatched);
* ``full_triton``: no window, Hopper prefill off (the Triton path a windowed call takes);
* ``window``: ``sliding_window`` (default 512) — routed to Triton for prefill;
* ``window_cap``: window and ``soft_cap`` (default 50).

A windowed call reads only ``window`` tokens per row, so against ``full_triton`` it should be
faster roughly by ctx / window; ``window`` against ``full`` is the price of the routing. The
Hopper path takes head_dim 64/128 only, so at Gemma's 256 ``full`` is Triton too; the routing
price shows with a Llama/Mistral head shape. Prints one JSON line per (case, impl).

    python scripts/bench_window.py --ctx 4096 --batch 64                       # Gemma 3 heads
    python scripts/bench_window.py --ctx 4096 --batch 64 --hq 32 --hkv 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernel import time_interleaved  # noqa: E402

from paged_jax.kernels import gpu  # noqa: E402


def inputs(rng, *, batch: int, q_len: int, ctx: int, hq: int, hkv: int, d: int, page: int):
    pages_per_seq = ctx // page
    num_pages = batch * pages_per_seq + 1  # page 0 = NULL_PAGE
    kk, kv, kq = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    k_pages = jax.random.normal(kk, (hkv, num_pages, page, d), jnp.bfloat16)
    v_pages = jax.random.normal(kv, (hkv, num_pages, page, d), jnp.bfloat16)
    q = jax.random.normal(kq, (batch * q_len, hq, d), jnp.bfloat16)
    tables = rng.permutation(np.arange(1, num_pages)).reshape(batch, pages_per_seq)
    meta = (np.full(batch, ctx), tables, np.arange(batch + 1) * q_len, [batch])
    return (q, k_pages, v_pages, *(jnp.asarray(a, jnp.int32) for a in meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64, help="decode sequences")
    ap.add_argument("--prefill", type=int, default=512, help="prefill chunk tokens (1 seq)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--soft-cap", type=float, default=50.0)
    ap.add_argument("--hq", type=int, default=4)
    ap.add_argument("--hkv", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    sm_scale = 1.0 / math.sqrt(args.head_dim)
    no_hopper = gpu.GpuBlockSizes(hopper_prefill=False)
    impls = {
        "full": dict(),
        "full_triton": dict(block_sizes=no_hopper),
        "window": dict(sliding_window=args.window),
        "window_cap": dict(sliding_window=args.window, soft_cap=args.soft_cap),
    }
    shape = dict(hq=args.hq, hkv=args.hkv, d=args.head_dim, page=args.page, ctx=args.ctx)
    cases = {
        "decode": inputs(rng, batch=args.batch, q_len=1, **shape),
        "prefill": inputs(rng, batch=1, q_len=args.prefill, **shape),
    }
    for case, xs in cases.items():
        fns = {
            name: (jax.jit(functools.partial(gpu.ragged_paged_attention, sm_scale=sm_scale, **kw)),
                   xs)
            for name, kw in impls.items()
        }  # fmt: skip
        times = time_interleaved(fns, reps=args.reps)
        for name, seconds in times.items():
            row = {"case": case, "impl": name, "us": seconds * 1e6,
                   "vs_full": times["full"] / seconds, **vars(args)}  # fmt: skip
            print(json.dumps(row))


if __name__ == "__main__":
    main()
