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
