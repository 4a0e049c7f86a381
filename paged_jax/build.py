"""Building an engine from an ``EngineConfig``: the model, the KV cache manager, the scheduler,
the runner (warmed up), the metrics and the driver, wired together. ``LLM`` holds the result.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from paged_jax.config import EngineConfig
from paged_jax.driver import Driver, Encoder
from paged_jax.engine.kv_cache import KVCacheManager
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.io.loader import RANDOM_PREFIX, LoadedModel, load_model
from paged_jax.io.tokenizer import Tokenizer
from paged_jax.io.weights import resolve_dtype
from paged_jax.kernels import resolve_impl, resolve_page_size
from paged_jax.metrics import EngineMetrics
from paged_jax.model.config import ModelConfig
from paged_jax.model.presets import param_bytes, preset_config
from paged_jax.runtime import tp
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.runner import ModelRunner, enable_compilation_cache
from paged_jax.runtime.state import bytes_per_page, free_device_bytes, num_pages_for_budget
from paged_jax.runtime.step import VARIANTS, invariant_rows

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Engine:
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    scheduler_config: SchedulerConfig
    kv_cache: KVCacheManager
    metrics: EngineMetrics
    driver: Driver
    load_seconds: float
    warmup_seconds: float


def build_engine(cfg: EngineConfig, *, encode: Encoder) -> Engine:
    """Load the model, size the KV pool, wire the pieces and warm up (when configured)."""
    if cfg.compilation_cache_dir:
        enable_compilation_cache(cfg.compilation_cache_dir)
    if cfg.batch_invariant:  # before loading: a clear error, not a failure after minutes
        invariant_rows(resolve_impl(cfg.attn_impl))
    loaded, mesh = _load_placed(cfg)
    model_config = loaded.config
    max_model_len = cfg.max_model_len or model_config.max_position_embeddings
    _check_model(cfg, model_config, loaded.tokenizer)
    kv_dtype = resolve_dtype(cfg.dtype if cfg.kv_dtype == "auto" else cfg.kv_dtype)
    page_size = resolve_page_size(cfg.page_size)  # unset: the TPU chip table's, else 16
    num_pages = cfg.num_pages or num_pages_for_budget(
        tp.local_config(model_config, cfg.tensor_parallel_size),
        page_size=page_size,
        dtype=kv_dtype,
        memory_fraction=cfg.kv_memory_fraction,
        cpu_bytes=cfg.kv_cpu_bytes,
        devices=None if mesh is None else list(mesh.devices.flat),
    )
    if cfg.num_pages is None and num_pages < 1 + -(-max_model_len // page_size):
        per_page = bytes_per_page(model_config, page_size, kv_dtype)
        budget = "kv_memory_fraction" if free_device_bytes() is not None else "kv_cpu_bytes"
        raise ValueError(
            f"the KV budget ({budget}={getattr(cfg, budget)}) holds {num_pages} pages of "
            f"{per_page} bytes (page_size={page_size}), fewer than the "
            f"{1 + -(-max_model_len // page_size)} that one max_model_len={max_model_len} "
            f"sequence needs (page 0 is reserved): at most "
            f"{max(num_pages - 1, 0) * page_size} tokens would fit; raise {budget}, or "
            "lower max_model_len"
        )
    scheduler_config = SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=max_model_len,
        reserve_full=cfg.reserve_full,
        decode_steps=cfg.decode_steps,
    )
    kv_cache = KVCacheManager(num_pages, page_size, cfg.enable_prefix_caching)
    eos = set(model_config.eos_token_ids)
    if loaded.tokenizer is not None:
        eos |= set(loaded.tokenizer.eos_token_ids)
    scheduler = Scheduler(scheduler_config, kv_cache, eos_token_ids=eos)
    runner = ModelRunner(
        model_config,
        loaded.params,
        num_pages=num_pages,
        page_size=page_size,
        max_pages_per_seq=kv_cache.pages_for(max_model_len),
        buckets=Buckets.create(cfg.max_num_batched_tokens, cfg.max_num_seqs),
        kv_dtype=kv_dtype,
        attn_impl=cfg.attn_impl,
        eos_token_ids=tuple(sorted(eos)),
        mesh=mesh,
        batch_invariant=cfg.batch_invariant,
    )
    runner.feeds_bursts = cfg.async_scheduling
    fused = cfg.fused_bursts if cfg.fused_bursts is not None else jax.default_backend() != "cpu"
    runner.fused_burst_steps = cfg.decode_steps if fused and cfg.decode_steps > 1 else 0
    pinned = cfg.pinned_inputs if cfg.pinned_inputs is not None else jax.default_backend() == "gpu"
    runner.wire_memory = "pinned_host" if pinned else "device"
    fold = cfg.fold_inputs if cfg.fold_inputs is not None else jax.default_backend() == "gpu"
    runner.fold_inputs = fold
    metrics = EngineMetrics(kv_cache)
    driver = Driver(
        scheduler,
        runner,
        metrics,
        encode=encode,
        tokenizer=loaded.tokenizer,
        model_name=cfg.model,
        default_seed=cfg.seed,
        async_scheduling=cfg.async_scheduling,
    )
    warmup_seconds = 0.0
    if cfg.warmup:
        warmup_seconds = runner.warmup(
            logprobs=cfg.warmup_logprobs,
            decode_bursts=cfg.decode_steps > 1,
            progress=cfg.warmup_progress,
            async_scheduling=cfg.async_scheduling,
        )
        logger.info(
            "warmup compiled %d executables in %.1fs (persistent cache: %s)",
            len(runner.warmup_seconds),
            warmup_seconds,
            runner.warmup_cache,
        )
    return Engine(model_config, loaded.tokenizer, scheduler_config, kv_cache, metrics, driver,
                  loaded.load_seconds, warmup_seconds)  # fmt: skip


def _load_placed(cfg: EngineConfig) -> tuple[LoadedModel, Mesh | None]:
    """The loaded model on the one device, or (``tensor_parallel_size`` > 1) loaded once (on
    the host, or random weights on the first device when they fit) and placed shard by shard
    on a mesh of local devices."""
    size = cfg.tensor_parallel_size
    if size == 1:
        return load_model(cfg.model, cfg.dtype), None
    tp.check_device_count(size)  # before a long load
    with jax.default_device(_staging_device(cfg.model, cfg.dtype)):
        loaded = load_model(cfg.model, cfg.dtype)
    tp.check_tp_size(loaded.config, size)
    mesh = tp.make_mesh(size)
    params = tp.shard_params(loaded.params, loaded.config, mesh)
    logger.info("tensor parallel over %d devices: %s", size, list(mesh.devices.flat))
    return dataclasses.replace(loaded, params=params), mesh


def _staging_device(model: str, dtype: Any) -> jax.Device:
    """Where the one full copy is made before ``shard_params``: the first device for random
    weights that fit half its free memory (drawn there, fast), else the host (checkpoints are
    read there anyway; a 70B model fits no single device)."""
    device = jax.local_devices()[0]
    if not model.startswith(RANDOM_PREFIX) or device.platform == "cpu":
        return jax.devices("cpu")[0]
    cfg = preset_config(model[len(RANDOM_PREFIX) :])
    d, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * f
    count = cfg.num_layers * per_layer + (1 if cfg.tie_word_embeddings else 2) * cfg.vocab_size * d
    free = free_device_bytes([device])
    fits = free is not None and count * jnp.dtype(resolve_dtype(dtype)).itemsize < free // 2
    return device if fits else jax.devices("cpu")[0]


def _check_model(cfg: EngineConfig, model: ModelConfig, tokenizer: Tokenizer | None) -> None:
    """Options the model cannot honour, and a tokenizer that does not match it."""
    if cfg.max_model_len is not None and cfg.max_model_len > model.max_position_embeddings:
        raise ValueError(
            f"max_model_len={cfg.max_model_len} is more than the model's "
            f"max_position_embeddings={model.max_position_embeddings}"
        )
    if tokenizer is not None and tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"the tokenizer of model={cfg.model!r} has {tokenizer.vocab_size} ids, more than "
            f"the model's vocab_size={model.vocab_size}: they do not belong together"
        )


def runner_stats(runner: ModelRunner) -> dict[str, Any]:
    """Compiles, warmup executables and model / KV sizes of a runner."""
    k_pages = runner.kv.k_pages  # per layer [Hkv, P, page_size, D]
    hkv, _, _, head_dim = k_pages[0].shape
    return {
        "compiles_after_warmup": runner.num_compiles_after_warmup,
        "warmup_executables": len(runner.warmup_seconds),
        "warmup_steps": sum(k.kind in VARIANTS for k in runner.warmup_seconds),
        "warmup_cache": dict(runner.warmup_cache),
        "compile_seconds": {  # every executable compiled so far, warmup or not
            f"T={k.num_tokens} S={k.num_seqs} {k.kind}": v for k, v in runner.warmup_seconds.items()
        },
        "param_bytes": param_bytes(runner.params),
        "embed_bytes": runner.params["embed"].nbytes,
        "kv_bytes_per_token": 2 * len(k_pages) * hkv * head_dim * k_pages[0].dtype.itemsize,
    }
