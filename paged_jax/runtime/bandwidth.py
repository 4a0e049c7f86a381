"""The card's streaming limit: the one bandwidth yardstick every benchmark divides by.

The limit is the best of a device copy (bytes read + written) and a streaming read (a
reduction over bf16), each over ``num_bytes`` (>= 4 GiB on a GPU) and timed with dispatch
overlapped: ``calls`` calls back to back, one block at the end, the fastest of ``rounds``
rounds. A single host-timed 1 GiB copy (what the benchmarks used before 2026-12) includes a
dispatch and a sync per call and understates an H200 by 1.4-1.6x.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

DEFAULT_BYTES = 4 * 2**30


def _time_calls(fn: Any, x: jax.Array, calls: int, rounds: int) -> float:
    """Fastest per-call seconds over ``rounds`` rounds of ``calls`` back-to-back calls."""
    jax.block_until_ready(fn(x))  # compile and warm up
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        outs = [fn(x) for _ in range(calls)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - start) / calls)
        del outs
    return best


def streaming_limit(
    num_bytes: int = DEFAULT_BYTES, calls: int = 10, rounds: int = 3, fill: str = "random"
) -> dict[str, float | str]:
    """{"bytes_per_s": the limit, "copy_bytes_per_s", "read_bytes_per_s", "method", ...}.

    ``fill``: "random" (normal bf16 values, what K/V and weights look like) or "ones" (a
    constant, which toggles fewer bits and can stream faster than real data)."""
    if num_bytes < 2**20 or calls < 1 or rounds < 1:
        raise ValueError(f"{num_bytes=} must be >= 1 MiB, {calls=} and {rounds=} >= 1")
    if fill not in ("random", "ones"):
        raise ValueError(f"{fill=} must be 'random' or 'ones'")
    n = num_bytes // 2
    if fill == "ones":
        x = jax.jit(lambda: jnp.ones((n,), jnp.bfloat16))()  # bf16[n]
    else:
        x = jax.jit(lambda: jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16))()
    copy = jax.jit(jnp.copy)  # reads and writes every byte
    read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))  # reads every byte
    if copy(x).unsafe_buffer_pointer() == x.unsafe_buffer_pointer():
        raise RuntimeError("the copy returned its input buffer: nothing was copied")
    copy_s = _time_calls(copy, x, calls, rounds)
    read_s = _time_calls(read, x, calls, rounds)
    nbytes = 2 * n
    copy_bw, read_bw = 2 * nbytes / copy_s, nbytes / read_s
    del x
    return {
        "bytes_per_s": max(copy_bw, read_bw),
        "copy_bytes_per_s": copy_bw,
        "read_bytes_per_s": read_bw,
        "bytes": nbytes,
        "calls": calls,
        "rounds": rounds,
        "method": f"best of copy (read + write) and bf16 sum over {nbytes / 2**30:.2g} GiB of "
        f"{fill} values, {calls} calls back to back per timing, fastest of {rounds}",
    }
