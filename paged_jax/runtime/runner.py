"""ModelRunner: owns the params, the KV state and one compiled step per bucket.

``run(plan)`` picks the smallest (T, S) bucket, packs the plan into padded arrays, calls that
bucket's executable (KV state donated) and returns the sampled token ids; a decode burst calls
it once per step, with ``runtime.burst.advance`` making the next inputs on the device. Warmup
compiles every reachable bucket ahead of time (a progress bar, with the persistent cache's
hits and misses) and logs the seconds each took; after warmup every backend compile that
happens inside this runner's ``run`` is counted (``num_compiles_after_warmup``) — it must stay
0. Compiles elsewhere (the user's own jnp code, another engine) are not this runner's.

With a ``mesh`` (tensor parallel, ``runtime/tp.py``) the KV pages are sharded on kv heads, the
step runs under ``shard_map`` and every input and output is replicated over the mesh; without
one (``tensor_parallel_size=1``) nothing of that runs: no sharding is given anywhere.

Dispatching (``run``, and ``start`` / ``select`` / ``fetch`` for async scheduling) is the
``runtime.dispatch.StepDispatch`` mixin.

Nothing module-level refers to a runner: dropping the engine frees its params and KV pages.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from paged_jax.engine.plan import StepPlan
from paged_jax.kernels import resolve_impl
from paged_jax.model.config import ModelConfig
from paged_jax.model.layers import all_rows
from paged_jax.model.llama import Params
from paged_jax.runtime import tp
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.burst import FusedBurst, advance, make_fused
from paged_jax.runtime.controls import STEP_INPUTS, make_process, pack_controls
from paged_jax.runtime.dispatch import (
    ExecutableKey,
    StepDispatch,
    _as_dict,
    _install_listener,
    step_variant_of_burst,
)
from paged_jax.runtime.feed import keep_last, widen
from paged_jax.runtime.folded import Folded, lower_wired
from paged_jax.runtime.pack import pack
from paged_jax.runtime.select import GREEDY, SELECT_INPUTS, SelectMode, make_select
from paged_jax.runtime.state import KVState, copy_pages
from paged_jax.runtime.step import VARIANTS, StepFn, invariant_rows, make_step
from paged_jax.runtime.warmup import compile_all, warmup_keys

logger = logging.getLogger(__name__)


def enable_compilation_cache(path: str) -> None:
    """Switch on JAX's persistent compilation cache in ``path``."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


class ModelRunner(StepDispatch):
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
        mesh: Mesh | None = None,
        platform: str | None = None,
        kv: KVState | None = None,
        batch_invariant: bool = False,
    ) -> None:
        """``platform`` (default: this process's) picks the attention kernel; ``kv`` replaces
        the page arrays (e.g. ``jax.ShapeDtypeStruct`` leaves, with abstract params, to lower
        the executables for another platform without allocating: scripts/lower_tpu.py).
        ``batch_invariant``: steps and selectors whose rows do not depend on each other
        (``runtime.step``); reference or gpu attention only."""
        self.cfg = cfg
        self.params = params
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.buckets = buckets
        self.mesh = mesh
        # step inputs and outputs: replicated over a tensor-parallel mesh; None: one device
        self._replicated = None if mesh is None else tp.replicated(mesh)
        self.kv = kv if kv is not None else self._create_kv(num_pages, kv_dtype)
        self.attn_impl = resolve_impl(attn_impl, platform)
        if self.attn_impl == "tpu_interpret":
            logger.warning("attn_impl='tpu' off a TPU: the Mosaic kernel runs in the TPU "
                           "interpreter, for checking, not for speed")  # fmt: skip
        self.batch_invariant = batch_invariant
        rows = invariant_rows(self.attn_impl) if batch_invariant else all_rows
        self._step_options = dict(
            attn_impl=self.attn_impl, eos_token_ids=eos_token_ids, batch_invariant=batch_invariant
        )
        self._steps = {
            variant: jax.jit(
                self._make_step(variant=variant, **self._step_options), donate_argnums=(1,)
            )  # fmt: skip
            for variant in VARIANTS
        }
        # Decode-only steps get their own executables where the kernel gains from knowing it.
        self.decode_variant = self.attn_impl == "gpu"
        self._advance = jax.jit(functools.partial(advance, page_size=page_size))
        self._copy = jax.jit(copy_pages, donate_argnums=(0,))
        self._widen = jax.jit(functools.partial(widen, size=buckets.seq_buckets[-1]))
        self._keep_last = jax.jit(keep_last)
        # track each burst row's last sample (async scheduling feeds the next step from it)
        self.feeds_bursts = False
        # bursts of this many steps run as one executable (runtime.burst.make_fused); 0: never
        self.fused_burst_steps = 0
        self.num_fused_bursts = 0  # fused bursts dispatched
        # the memory the wire buffer is sent to: "pinned_host" lets the step call go on
        # without waiting for a host-to-device transfer (runtime.wire); set by build
        self.wire_memory = "device"
        # the step executables unpack their own wire buffer (runtime.folded); set by build
        self.fold_inputs = False
        self._zero = jax.device_put(np.int32(0), self._replicated)  # i32[]: a burst's step 0
        width = buckets.seq_buckets[-1]  # i32[S_max]: feeds no token (source rows all -1)
        self._no_feed = jax.device_put(np.zeros(width, np.int32), self._replicated)
        self._process = jax.jit(make_process(eos_token_ids, cfg.vocab_size))
        self._select = functools.partial(make_select, eos_token_ids=eos_token_ids,
                                         vocab_size=cfg.vocab_size, rows=rows)  # fmt: skip
        self._executables: dict[ExecutableKey, Any] = {}
        self.warmup_seconds: dict[ExecutableKey, float] = {}
        self.warmed_up = False
        self.num_compiles_after_warmup = 0
        self.last_timing = (0.0, 0.0, 0.0)
        self.warmup_cache = {"hits": 0, "misses": 0}  # persistent compilation cache
        _install_listener()

    def _create_kv(self, num_pages: int, kv_dtype: Any) -> KVState:
        """Zeroed KV pages: on the one device, or kv heads sharded over the mesh."""
        if self.mesh is None:
            return KVState.create(self.cfg, num_pages, self.page_size, kv_dtype)
        return tp.create_kv(self.cfg, self.mesh, num_pages, self.page_size, kv_dtype)

    def _make_step(self, **options: Any) -> StepFn:
        """The step of one device, or of one shard under ``shard_map`` over the mesh."""
        if self.mesh is None:
            return make_step(self.cfg, **options)
        return tp.make_tp_step(self.cfg, self.mesh, self.params, **options)

    def _inputs_spec(self, num_tokens: int, num_seqs: int) -> dict[str, jax.ShapeDtypeStruct]:
        empty = pack(
            StepPlan(scheduled=()),
            num_tokens_bucket=num_tokens,
            num_seqs_bucket=num_seqs,
            page_size=self.page_size,
            max_pages_per_seq=self.max_pages_per_seq,
        )
        return {k: self._struct(v.shape, v.dtype) for k, v in _as_dict(empty).items()}

    @property
    def _on_device(self) -> jax.sharding.Sharding:
        """Where step inputs live: replicated over the mesh, or on the one device."""
        return self._replicated or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    @property
    def wire_sharding(self) -> jax.sharding.Sharding | None:
        """Where ``start`` puts a step's wire buffer (``wire_memory``; None: the default)."""
        if self.wire_memory == "device":
            return self._replicated
        return self._on_device.with_memory_kind(self.wire_memory)

    def _struct(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

    def lower_args(self, key: ExecutableKey) -> tuple[Any, tuple]:
        """(jitted function, abstract arguments) of an executable, for lowering or export."""
        num_tokens, num_seqs, kind = key
        inputs = self._inputs_spec(max(num_tokens, num_seqs), num_seqs)
        row = self._struct((num_seqs,), jnp.int32)
        if isinstance(kind, SelectMode):
            logits = self._struct((num_seqs, self.cfg.vocab_size), jnp.float32)
            chosen = {k: inputs[k] for k in SELECT_INPUTS}
            return jax.jit(self._select(kind)), (logits, logits, row, chosen)
        if kind == "controls":
            logits = self._struct((num_seqs, self.cfg.vocab_size), jnp.float32)
            controls = pack_controls(StepPlan(scheduled=()), {}, num_seqs, self.cfg.vocab_size)
            controls = {k: self._struct(v.shape, v.dtype) for k, v in controls.items()}
            chosen = {k: inputs[k] for k in STEP_INPUTS}
            return self._process, (logits, self.kv.token_pages, chosen, controls)
        if kind == "copy":
            return self._copy, (self.kv, row, row)
        if kind == "widen":
            return self._widen, (row,)
        if kind == "keep":
            return self._keep_last, (row, row, self._struct((), jnp.int32), row)
        if kind in ("unpack", "unpack_feed") or isinstance(kind, Folded):
            return lower_wired(self, key, inputs)
        if kind == "advance":
            return self._advance, (inputs, row, self._struct((), jnp.int32))
        if isinstance(kind, FusedBurst):
            return self._fused(key), (self.params, self.kv, inputs)
        return self._steps[kind], (self.params, self.kv, inputs)

    def _fused(self, key: ExecutableKey) -> Any:
        """The jitted fused burst of a decode bucket and selection (``runtime.burst``)."""
        return jax.jit(self._fused_fn(key), donate_argnums=(1,))

    def _fused_fn(self, key: ExecutableKey) -> Any:
        num_tokens, num_seqs, kind = key
        variant = step_variant_of_burst(num_tokens, num_seqs, self.decode_variant)
        step = self._make_step(variant=variant, **self._step_options)
        select = None if kind.mode == GREEDY else self._select(kind.mode)
        return make_fused(step, select, num_steps=self.fused_burst_steps, page_size=self.page_size)

    def _lower(self, key: ExecutableKey) -> Any:
        fn, args = self.lower_args(key)
        return fn.lower(*args)

    def _compile(self, key: ExecutableKey, lowered: Any = None) -> Any:
        start = time.perf_counter()
        executable = (lowered or self._lower(key)).compile()
        self.warmup_seconds[key] = time.perf_counter() - start
        self._executables[key] = executable
        return executable

    def _executable(self, key: ExecutableKey) -> Any:
        return self._executables.get(key) or self._compile(key)

    def warmup(
        self,
        logprobs: bool = False,
        decode_bursts: bool = False,
        progress: bool = True,
        async_scheduling: bool = False,
    ) -> float:
        """Compile every reachable bucket, the selectors that sample (and the logprobs step and
        selectors when asked), and the burst advance of every decode-only bucket; returns the
        wall seconds. Tracing is serial; XLA compiles on a thread per CPU core."""
        start = time.perf_counter()
        keys = self.warmup_keys(logprobs, decode_bursts, async_scheduling)
        keys = [key for key in keys if key not in self._executables]
        self.warmup_cache = compile_all(keys, self._lower, self._compile, progress=progress)
        for key in keys:
            logger.info("compiled T=%d S=%d %s in %.2fs", *key, self.warmup_seconds[key])
        self.warmed_up = True
        return time.perf_counter() - start

    def warmup_keys(
        self, logprobs: bool = False, decode_bursts: bool = False, async_scheduling: bool = False
    ) -> list:
        """Every executable warmup compiles (``runtime.warmup.warmup_keys``)."""
        return warmup_keys(
            self.buckets, fold_inputs=self.fold_inputs, decode_variant=self.decode_variant,
            fused_burst_steps=self.fused_burst_steps, logprobs=logprobs,
            decode_bursts=decode_bursts, async_scheduling=async_scheduling,
        )  # fmt: skip

    def fill_free_pages(self, page_ids: list[int], value: float = float("nan")) -> None:
        """Overwrite pages (e.g. every free one) with ``value``: a test hook for stray reads.
        One compile per page-array shape, whichever pages (it may run before every step)."""
        mask = np.zeros(self.kv.k_pages[0].shape[1], bool)  # bool[num_pages]
        mask[np.asarray(page_ids, np.int64)] = True
        mask = jnp.asarray(mask)
        warmed_up, self.warmed_up = self.warmed_up, False  # not a serving compile
        self.kv = KVState(
            k_pages=tuple(_fill_pages(a, mask, value) for a in self.kv.k_pages),
            v_pages=tuple(_fill_pages(a, mask, value) for a in self.kv.v_pages),
            token_pages=self.kv.token_pages,
        )
        self.warmed_up = warmed_up

    def close(self) -> None:
        """Free the KV pages and the compiled executables now (the params stay the caller's)."""
        for page in (*self.kv.k_pages, *self.kv.v_pages, self.kv.token_pages):
            page.delete()
        self._executables.clear()


@functools.partial(jax.jit, donate_argnums=0)
def _fill_pages(pages: jax.Array, mask: jax.Array, value: float) -> jax.Array:
    # pages: [Hkv, P, page_size, D]; mask: bool[P]
    return jnp.where(mask[None, :, None, None], jnp.asarray(value, pages.dtype), pages)
