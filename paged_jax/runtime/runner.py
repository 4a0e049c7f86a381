"""ModelRunner: owns the params, the KV state and one compiled step per bucket.

``run(plan)`` picks the smallest (T, S) bucket, packs the plan into padded arrays, calls that
bucket's executable (KV state donated) and returns the sampled token ids. Warmup compiles
every reachable bucket ahead of time and logs the seconds each took; after warmup every
backend compile is counted (``num_compiles_after_warmup``) — it must stay 0.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.engine.plan import StepPlan
from paged_jax.model.config import ModelConfig
from paged_jax.model.llama import Params
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.pack import StepInputs, pack
from paged_jax.runtime.state import KVState
from paged_jax.runtime.step import make_step

logger = logging.getLogger(__name__)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_listening_runners: list[ModelRunner] = []


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event == _COMPILE_EVENT:
        for runner in _listening_runners:
            if runner.warmed_up:
                runner.num_compiles_after_warmup += 1


_listener_installed = False


def _install_listener() -> None:
    global _listener_installed
    if not _listener_installed:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listener_installed = True


def enable_compilation_cache(path: str) -> None:
    """Switch on JAX's persistent compilation cache in ``path``."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        num_pages: int,
        page_size: int,
        max_pages_per_seq: int,
        buckets: Buckets,
        kv_dtype: Any,
        attn_impl: str = "auto",
        eos_token_ids: tuple[int, ...] = (),
        seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.params = params
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.buckets = buckets
        self.seed = seed
        self.kv = KVState.create(cfg, num_pages, page_size, kv_dtype)
        self._step = jax.jit(
            make_step(cfg, attn_impl=attn_impl, eos_token_ids=eos_token_ids), donate_argnums=(1,)
        )
        self._executables: dict[tuple[int, int], Any] = {}
        self.warmup_seconds: dict[tuple[int, int], float] = {}
        self.warmed_up = False
        self.num_compiles_after_warmup = 0
        self.last_timing = (0.0, 0.0, 0.0)
        _install_listener()
        _listening_runners.append(self)

    def _inputs_spec(self, num_tokens: int, num_seqs: int) -> dict[str, jax.ShapeDtypeStruct]:
        empty = pack(
            StepPlan(scheduled=()),
            num_tokens_bucket=num_tokens,
            num_seqs_bucket=num_seqs,
            page_size=self.page_size,
            max_pages_per_seq=self.max_pages_per_seq,
        )
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _as_dict(empty).items()}

    def _compile(self, bucket: tuple[int, int]) -> Any:
        start = time.perf_counter()
        executable = self._step.lower(self.params, self.kv, self._inputs_spec(*bucket)).compile()
        self.warmup_seconds[bucket] = time.perf_counter() - start
        self._executables[bucket] = executable
        return executable

    def warmup(self) -> float:
        """Compile every reachable bucket; returns total seconds. Logs seconds per bucket."""
        total = 0.0
        for bucket in self.buckets.reachable():
            if bucket not in self._executables:
                self._compile(bucket)
                total += self.warmup_seconds[bucket]
                logger.info(
                    "compiled bucket T=%d S=%d in %.2fs", *bucket, self.warmup_seconds[bucket]
                )
        self.warmed_up = True
        return total

    def run(self, plan: StepPlan) -> np.ndarray:
        """Execute one step. Returns i32[num_seqs] sampled ids (meaningful where plan samples)."""
        start = time.perf_counter()
        bucket = self.buckets.pick_bucket(plan.num_tokens, plan.num_seqs)
        executable = self._executables.get(bucket) or self._compile(bucket)
        inputs = pack(
            plan,
            num_tokens_bucket=bucket[0],
            num_seqs_bucket=bucket[1],
            page_size=self.page_size,
            max_pages_per_seq=self.max_pages_per_seq,
            default_seed=self.seed,
        )
        packed = time.perf_counter()
        self.kv, sampled = executable(self.params, self.kv, _as_dict(inputs))
        dispatched = time.perf_counter()
        out = np.asarray(sampled)[: plan.num_seqs]  # waits for the device
        # host seconds packing, host seconds dispatching, seconds waiting for the device
        self.last_timing = (packed - start, dispatched - packed, time.perf_counter() - dispatched)
        return out

    def fill_free_pages(self, page_ids: list[int], value: float = float("nan")) -> None:
        """Overwrite pages (e.g. every free one) with ``value``: a test hook for stray reads."""
        idx = jnp.asarray(page_ids, jnp.int32)
        fill = jax.jit(lambda a: a.at[:, idx].set(value), donate_argnums=0)
        warmed_up, self.warmed_up = self.warmed_up, False  # not a serving compile
        self.kv = KVState(
            k_pages=tuple(fill(a) for a in self.kv.k_pages),
            v_pages=tuple(fill(a) for a in self.kv.v_pages),
        )
        self.warmed_up = warmed_up

    def close(self) -> None:
        if self in _listening_runners:
            _listening_runners.remove(self)


def _as_dict(inputs: StepInputs) -> dict[str, np.ndarray]:
    return {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
