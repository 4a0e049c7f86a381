"""Warmup compiles: trace serially, compile on a thread per core, and show it.

A progress bar counts executables as they finish compiling, with the persistent compilation
cache's hits and misses so far (a warm cache turns 25-50 s on a CPU into a few).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
from tqdm import tqdm

from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.burst import BURST_MODES, FusedBurst
from paged_jax.runtime.dispatch import ExecutableKey, step_variant_of_burst
from paged_jax.runtime.folded import Folded
from paged_jax.runtime.select import GREEDY, SelectMode

_CACHE_EVENTS = {
    "/jax/compilation_cache/cache_hits": "hits",
    "/jax/compilation_cache/cache_misses": "misses",
}
_counts = {"hits": 0, "misses": 0}  # process-wide persistent-cache events (ints only)
_lock = threading.Lock()
_installed = False


def _on_event(event: str, **_: Any) -> None:
    name = _CACHE_EVENTS.get(event)
    if name is not None:
        with _lock:
            _counts[name] += 1


def cache_counts() -> dict[str, int]:
    """Persistent compilation cache hits and misses in this process so far."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_listener(_on_event)
            _installed = True
        return dict(_counts)


def compile_all(
    keys: Sequence[Any],
    lower: Callable[[Any], Any],
    compile_one: Callable[[Any, Any], Any],
    *,
    progress: bool = True,
) -> dict[str, int]:
    """Lower every key (serially), then compile them in parallel with a progress bar.
    Returns this warmup's persistent-cache hits and misses."""
    before = cache_counts()
    lowered = {}
    with tqdm(total=len(keys), desc="warmup: trace", unit="exe", disable=not progress) as bar:
        for key in keys:
            lowered[key] = lower(key)
            bar.update()
    workers = max(1, min(len(lowered), os.cpu_count() or 1))
    with (
        tqdm(total=len(keys), desc="warmup: compile", unit="exe", disable=not progress) as bar,
        concurrent.futures.ThreadPoolExecutor(workers) as pool,
    ):
        futures = [pool.submit(compile_one, key, low) for key, low in lowered.items()]
        for future in concurrent.futures.as_completed(futures):
            future.result()
            now = cache_counts()
            bar.set_postfix(
                cache_hits=now["hits"] - before["hits"],
                cache_misses=now["misses"] - before["misses"],
                refresh=False,
            )
            bar.update()
    now = cache_counts()
    return {k: now[k] - before[k] for k in now}


def warmup_keys(
    buckets: Buckets,
    *,
    fold_inputs: bool,
    decode_variant: bool,
    fused_burst_steps: bool,
    logprobs: bool = False,
    decode_bursts: bool = False,
    async_scheduling: bool = False,
) -> list[ExecutableKey]:
    """Every executable warmup compiles: the step of each reachable bucket (and its
    decode-only and prompt-scoring variants where they apply), the selectors, the page
    copies, the burst advances, the input unpacking of each bucket (``runtime.wire``; with
    async scheduling also its token-feeding twin). With ``fold_inputs`` the steps unpack
    their own inputs (``runtime.folded``), and a non-fused burst's further steps are the
    plain step executables of the decode buckets."""
    variants = ("plain", "prompt") if logprobs else ("plain",)
    reachable = buckets.reachable()
    decode_buckets = buckets.decode_buckets()
    fold = Folded if fold_inputs else lambda kind: kind
    keys = [ExecutableKey(*bucket, fold(v)) for bucket in reachable for v in variants]
    if not fold_inputs:
        keys += [ExecutableKey(*bucket, "unpack") for bucket in reachable]
    if decode_variant:
        keys += [ExecutableKey(*b, fold("decode")) for b in decode_buckets if b[0] == b[1]]
    # sampling, and greedy with candidates' logprobs (beam search)
    modes = [SelectMode(True, False, False), SelectMode(True, True, False)]
    modes.append(GREEDY._replace(logprobs=True))
    if logprobs:
        modes += [m._replace(logprobs=True) for m in modes[:2]]
    seq_buckets = sorted({s for _, s in reachable})
    keys += [ExecutableKey(0, s, m) for s in seq_buckets for m in modes]
    keys += [ExecutableKey(0, s, "controls") for s in seq_buckets]
    keys += [ExecutableKey(0, s, "copy") for s in buckets.seq_buckets]
    if decode_bursts:
        keys += [ExecutableKey(*b, "advance") for b in decode_buckets]
        if fold_inputs:  # a burst's further steps take their inputs from advance
            keys += [ExecutableKey(*b, step_variant_of_burst(*b, decode_variant))
                     for b in decode_buckets]  # fmt: skip
        if fused_burst_steps:
            keys += [ExecutableKey(*b, fold(FusedBurst(mode)))
                     for b in decode_buckets for mode in BURST_MODES]  # fmt: skip
    if async_scheduling:
        keys += [ExecutableKey(0, s, "widen") for s in buckets.seq_buckets]
        if decode_bursts:
            keys += [ExecutableKey(0, s, "keep") for s in sorted({s for _, s in decode_buckets})]
        if not fold_inputs:
            keys += [ExecutableKey(*bucket, "unpack_feed") for bucket in reachable]
    return list(dict.fromkeys(keys))
