"""ModelRunner: owns the params, the KV state and one compiled step per bucket.

``run(plan)`` picks the smallest (T, S) bucket, packs the plan into padded arrays, calls that
bucket's executable (KV state donated) and returns the sampled token ids; a decode burst calls
it once per step, with ``runtime.burst.advance`` making the next inputs on the device. Warmup
compiles every reachable bucket ahead of time and logs the seconds each took; after warmup
every backend compile is counted (``num_compiles_after_warmup``) — it must stay 0.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.engine.plan import StepPlan
from paged_jax.model.config import ModelConfig
from paged_jax.model.llama import Params
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.burst import advance
from paged_jax.runtime.pack import StepInputs, pack
from paged_jax.runtime.state import KVState
from paged_jax.runtime.step import VARIANTS, make_step

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
        self._steps = {
            variant: jax.jit(
                make_step(cfg, attn_impl=attn_impl, eos_token_ids=eos_token_ids, variant=variant),
                donate_argnums=(1,),
            )
            for variant in VARIANTS
        }
        self._advance = jax.jit(functools.partial(advance, page_size=page_size))
        # keyed by (T, S, variant); the burst's advance by (T, S, "advance")
        self._executables: dict[tuple[int, int, str], Any] = {}
        self.warmup_seconds: dict[tuple[int, int, str], float] = {}
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

    def _compile(self, key: tuple[int, int, str]) -> Any:
        start = time.perf_counter()
        inputs = self._inputs_spec(*key[:2])
        if key[2] == "advance":
            row = jax.ShapeDtypeStruct((key[1],), jnp.int32)
            step = jax.ShapeDtypeStruct((), jnp.int32)
            lowered = self._advance.lower(inputs, row, row, row, step)
        else:
            lowered = self._steps[key[2]].lower(self.params, self.kv, inputs)
        executable = lowered.compile()
        self.warmup_seconds[key] = time.perf_counter() - start
        self._executables[key] = executable
        return executable

    def _executable(self, key: tuple[int, int, str]) -> Any:
        return self._executables.get(key) or self._compile(key)

    def warmup(self, logprobs: bool = False, decode_bursts: bool = False) -> float:
        """Compile every reachable bucket (the logprobs variants too when asked, and the burst
        advance of every decode-only bucket); returns total seconds. Logs seconds per bucket."""
        total = 0.0
        variants = VARIANTS if logprobs else ("plain",)
        keys = [(*bucket, v) for bucket in self.buckets.reachable() for v in variants]
        if decode_bursts:
            keys += [(*bucket, "advance") for bucket in self.buckets.decode_buckets()]
        for key in keys:
            if key not in self._executables:
                self._compile(key)
                total += self.warmup_seconds[key]
                logger.info("compiled T=%d S=%d %s in %.2fs", *key, self.warmup_seconds[key])
        self.warmed_up = True
        return total

    def run(self, plan: StepPlan) -> StepOutput:
        """Execute one step (or a decode burst): sampled ids for the plan's rows (meaningful
        where it samples; i32[n, burst_len] for a burst), and the logprob arrays when some
        request asked for them."""
        if plan.num_steps:
            return self._run_burst(plan)
        start = time.perf_counter()
        want_prompt = any(
            i.seq.sampling_params.prompt_logprobs is not None
            and i.start_position < i.seq.num_prompt_tokens - 1
            for i in plan.scheduled
        )
        want_logprobs = any(
            i.sample and i.seq.sampling_params.logprobs is not None for i in plan.scheduled
        )
        variant = "prompt" if want_prompt else "logprobs" if want_logprobs else "plain"
        key = (*self.buckets.pick_bucket(plan.num_tokens, plan.num_seqs), variant)
        executable = self._executable(key)
        inputs = pack(
            plan,
            num_tokens_bucket=key[0],
            num_seqs_bucket=key[1],
            page_size=self.page_size,
            max_pages_per_seq=self.max_pages_per_seq,
            default_seed=self.seed,
        )
        packed = time.perf_counter()
        self.kv, out = executable(self.params, self.kv, _as_dict(inputs))
        dispatched = time.perf_counter()
        n, t = plan.num_seqs, plan.num_tokens
        result = StepOutput(
            sampled=np.asarray(out["sampled"])[:n],  # waits for the device
            logprobs=_fetch(out["logprobs"], n) if want_logprobs else None,
            prompt_logprobs=_fetch(out["prompt"], t) if want_prompt else None,
        )
        # host seconds packing, host seconds dispatching, seconds waiting for the device
        self.last_timing = (packed - start, dispatched - packed, time.perf_counter() - dispatched)
        return result

    def _run_burst(self, plan: StepPlan) -> StepOutput:
        start = time.perf_counter()
        n = plan.num_seqs
        bucket = self.buckets.pick_bucket(n, n)
        executable = self._executable((*bucket, "plain"))
        advance_fn = self._executable((*bucket, "advance"))
        inputs = pack(
            plan,
            num_tokens_bucket=bucket[0],
            num_seqs_bucket=bucket[1],
            page_size=self.page_size,
            max_pages_per_seq=self.max_pages_per_seq,
            default_seed=self.seed,
        )
        num_steps = np.zeros(bucket[1], np.int32)  # i32[S]
        num_steps[:n] = plan.num_steps
        min_tokens = np.zeros(bucket[1], np.int32)  # i32[S]
        min_tokens[:n] = [i.seq.sampling_params.min_tokens for i in plan.scheduled]
        step_inputs, num_steps, min_tokens, step = jax.device_put(
            (_as_dict(inputs), num_steps, min_tokens, np.int32(0))
        )
        packed = time.perf_counter()
        sampled = []
        for j in range(plan.burst_len):
            self.kv, out = executable(self.params, self.kv, step_inputs)
            sampled.append(out["sampled"])
            if j + 1 < plan.burst_len:
                step_inputs, step = advance_fn(step_inputs, out["sampled"], num_steps,
                                               min_tokens, step)  # fmt: skip
        dispatched = time.perf_counter()
        tokens = np.stack(jax.device_get(sampled), axis=1)[:n]  # i32[n, burst_len]; waits
        self.last_timing = (packed - start, dispatched - packed, time.perf_counter() - dispatched)
        return StepOutput(sampled=tokens, logprobs=None, prompt_logprobs=None)

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


class StepOutput(NamedTuple):
    sampled: np.ndarray  # i32[num_seqs]; a burst: i32[num_seqs, burst_len]
    logprobs: dict[str, np.ndarray] | None  # target f32[n], top_ids i32[n, K], top f32[n, K]
    prompt_logprobs: dict[str, np.ndarray] | None  # the same per packed token [num_tokens]


def _fetch(arrays: dict[str, jax.Array], n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in arrays.items()}


def _as_dict(inputs: StepInputs) -> dict[str, np.ndarray]:
    return {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
