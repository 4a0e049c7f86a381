"""Tensor parallelism over a 1-D ``jax.sharding.Mesh`` of local devices (axis ``"tp"``).

Applied after the model is loaded, in this one module (gpt-fast's ``tp.py`` pattern); with
``tensor_parallel_size=1`` none of it runs and the engine takes its one-device path.

Megatron layout. Each shard ``i`` of ``tp`` holds ``Hq / tp`` query heads and the kv heads they
read, ``F / tp`` FFN columns, and runs the unchanged model forward on them with a *local*
``ModelConfig`` under ``shard_map``; the partial outputs of ``wo`` and ``w_down`` are summed
across shards (``lax.psum``, two all-reduces of ``[T, D]`` per layer). Per param:

    wqkv [D, (Hq + 2 Hkv) Dh]  columns, re-laid per shard as [q_i | k_i | v_i] (the fused
                               layout cannot be cut into contiguous blocks otherwise)
    bqkv                       the same, on its only axis
    w_gate_up [D, 2 F]         columns, re-laid per shard as [gate_i | up_i]
    wo [Hq Dh, D], w_down [F, D]  rows (contiguous: no re-layout)
    embed, lm_head, norms, q/k norms, bo   replicated (docs/scale-out.md says why)

KV pages ``[Hkv, P, page_size, Dh]`` are sharded on axis 0, so each device's attention kernel
reads only its own heads. When ``tp > Hkv`` each kv head is stored on ``tp / Hkv`` devices (as
vLLM does): shard ``i`` holds kv head ``i // (tp / Hkv)`` and the global page array has ``tp``
heads. A param is placed with ``jax.make_array_from_callback`` straight from its one host copy:
each device receives only its shard. ``abstract_params`` / ``abstract_kv`` give the same global
shapes and shardings as ``jax.ShapeDtypeStruct`` leaves (lowering for TPU: scripts/lower_tpu.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from paged_jax.model.config import ModelConfig
from paged_jax.model.llama import Params
from paged_jax.runtime.state import KVState
from paged_jax.runtime.step import StepFn, make_step

AXIS = "tp"


def check_device_count(tp: int) -> None:
    """ValueError naming ``tensor_parallel_size`` when this process has fewer devices."""
    num_devices = len(jax.local_devices())
    if tp > num_devices:
        raise ValueError(
            f"tensor_parallel_size={tp} is more than the {num_devices} local device(s)"
        )


def check_tp_size(cfg: ModelConfig, tp: int) -> None:
    """ValueError naming ``tensor_parallel_size`` when ``tp`` cannot shard ``cfg`` (or this
    process has fewer devices)."""
    name = f"tensor_parallel_size={tp}"
    if cfg.num_heads % tp:
        raise ValueError(f"{name} must divide the model's num_heads={cfg.num_heads}")
    if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
        raise ValueError(
            f"{name} must divide num_kv_heads={cfg.num_kv_heads} or be a multiple of it"
        )
    if cfg.intermediate_size % tp:
        raise ValueError(f"{name} must divide intermediate_size={cfg.intermediate_size}")
    check_device_count(tp)


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config one shard's forward sees: its heads, its kv heads, its FFN columns."""
    if tp == 1:
        return cfg
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // tp,
        num_kv_heads=max(1, cfg.num_kv_heads // tp),
        intermediate_size=cfg.intermediate_size // tp,
    )


def make_mesh(tp: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over the first ``tp`` local devices."""
    devices = list(jax.local_devices() if devices is None else devices)[:tp]
    return Mesh(np.asarray(devices), (AXIS,))


def _kv_heads_of_shard(cfg: ModelConfig, tp: int, shard: int) -> np.ndarray:
    """Global kv head ids that shard ``shard`` stores (one, replicated, when tp > Hkv)."""
    if cfg.num_kv_heads >= tp:
        per = cfg.num_kv_heads // tp
        return np.arange(shard * per, (shard + 1) * per)
    return np.asarray([shard // (tp // cfg.num_kv_heads)])


def _heads(ids: np.ndarray, head_dim: int, offset: int = 0) -> np.ndarray:
    # head ids -> their column ids, head-major
    return offset + (ids[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)


def _shard_indices(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, Callable[[int], Any]]]:
    """Sharded params by name: (axis, shard -> indices into the loaded layout's axis)."""
    dh, f = cfg.head_dim, cfg.intermediate_size // tp
    q_heads = cfg.num_heads // tp

    def qkv(i: int) -> np.ndarray:
        kv = _kv_heads_of_shard(cfg, tp, i)
        q = _heads(np.arange(i * q_heads, (i + 1) * q_heads), dh)
        k = _heads(kv, dh, cfg.q_size)
        v = _heads(kv, dh, cfg.q_size + cfg.kv_size)
        return np.concatenate([q, k, v])

    def gate_up(i: int) -> np.ndarray:
        cols = np.arange(i * f, (i + 1) * f)
        return np.concatenate([cols, cfg.intermediate_size + cols])

    def rows(width: int) -> Callable[[int], slice]:
        return lambda i: slice(i * width, (i + 1) * width)

    return {
        "wqkv": (1, qkv),
        "bqkv": (0, qkv),
        "w_gate_up": (1, gate_up),
        "wo": (0, rows(q_heads * dh)),
        "w_down": (0, rows(f)),
    }


def _spec(ndim: int, axis: int | None) -> P:
    return P(*(AXIS if d == axis else None for d in range(ndim)))


def param_specs(params: Params, cfg: ModelConfig, tp: int) -> Params:
    """A PartitionSpec per param leaf (the ``shard_map`` in_specs of the params)."""
    rules = _shard_indices(cfg, tp)

    def spec(name: str, leaf: Any) -> P:
        axis = rules[name][0] if name in rules else None
        return _spec(np.ndim(leaf), axis)

    return _map_named(spec, params)


def _map_named(fn: Callable[[str, Any], Any], params: Params) -> Params:
    """``fn(name, leaf)`` over the documented pytree (per-layer dicts keyed by param name)."""
    out = {k: fn(k, v) for k, v in params.items() if k != "layers"}
    out["layers"] = [{k: fn(k, v) for k, v in layer.items()} for layer in params["layers"]]
    return out


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Place the loaded params (host or one-device arrays, the layout ``model/llama.py``
    documents) on the mesh: sharded params re-laid per shard, each device given only its
    shard; the rest replicated."""
    tp = mesh.shape[AXIS]
    rules = _shard_indices(cfg, tp)

    def place(name: str, leaf: Any) -> jax.Array:
        if name not in rules:
            return jax.device_put(leaf, NamedSharding(mesh, P()))
        axis, indices = rules[name]
        host = np.asarray(leaf)  # the one host copy (a view of a CPU array)
        shape, width = _global_shape(host.shape, axis, indices, tp)

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            i = (index[axis].start or 0) // width
            return np.take(host, np.arange(host.shape[axis])[indices(i)], axis=axis)

        sharding = NamedSharding(mesh, _spec(host.ndim, axis))
        return jax.make_array_from_callback(shape, sharding, shard)

    return _map_named(place, params)


def _global_shape(
    shape: tuple[int, ...], axis: int, indices: Callable[[int], Any], tp: int
) -> tuple[tuple[int, ...], int]:
    """(the placed array's global shape, one shard's width on ``axis``): re-laid shards can be
    wider in total than the loaded axis (kv heads stored on several devices)."""
    width = len(np.arange(shape[axis])[indices(0)])
    return tuple(tp * width if d == axis else n for d, n in enumerate(shape)), width


def abstract_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """What ``shard_params`` would place, as shapes only: a ``jax.ShapeDtypeStruct`` per param
    (``params`` may be shapes too, e.g. from ``jax.eval_shape``) with its global shape and its
    sharding, to lower the tensor-parallel executables without weights or devices' memory."""
    tp = mesh.shape[AXIS]
    rules = _shard_indices(cfg, tp)

    def place(name: str, leaf: Any) -> jax.ShapeDtypeStruct:
        if name not in rules:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated(mesh))
        axis, indices = rules[name]
        shape = _global_shape(leaf.shape, axis, indices, tp)[0]
        sharding = NamedSharding(mesh, _spec(len(shape), axis))
        return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding)

    return _map_named(place, params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_kv(cfg: ModelConfig, mesh: Mesh, num_pages: int, page_size: int, dtype: Any) -> KVState:
    """Zeroed KV pages with ``tp * local kv heads`` heads, kv heads across the mesh."""
    size = mesh.shape[AXIS]
    heads = size * local_config(cfg, size).num_kv_heads
    return KVState.create(
        cfg, num_pages, page_size, dtype, num_kv_heads=heads, sharding=NamedSharding(mesh, P(AXIS))
    )


def abstract_kv(
    cfg: ModelConfig, mesh: Mesh, num_pages: int, page_size: int, dtype: Any
) -> KVState:
    """``create_kv``'s pages as ``jax.ShapeDtypeStruct`` leaves with their shardings."""
    size = mesh.shape[AXIS]
    heads = size * local_config(cfg, size).num_kv_heads
    pages = jax.ShapeDtypeStruct(  # [tp * local Hkv, P, page_size, Dh]
        (heads, num_pages, page_size, cfg.head_dim), dtype, sharding=NamedSharding(mesh, P(AXIS))
    )
    tokens = jax.ShapeDtypeStruct((num_pages, page_size), np.int32, sharding=replicated(mesh))
    layers = (pages,) * cfg.num_layers
    return KVState(k_pages=layers, v_pages=layers, token_pages=tokens)


def make_tp_step(cfg: ModelConfig, mesh: Mesh, params: Params, **step_options: Any) -> StepFn:
    """``make_step`` on one shard's heads under ``shard_map``: params sharded as
    ``param_specs``, KV pages on kv heads, step inputs and outputs (logits, samples)
    replicated."""
    size = mesh.shape[AXIS]
    inner = make_step(
        local_config(cfg, size),
        all_reduce=functools.partial(jax.lax.psum, axis_name=AXIS),
        **step_options,
    )
    pages = (P(AXIS),) * cfg.num_layers
    kv_specs = KVState(k_pages=pages, v_pages=pages, token_pages=P())  # token ids replicated
    # check_vma off: the kernels' loop carries start device-invariant (zeros) and become
    # per-shard; the outputs are replicated by construction (computed after the psums).
    return jax.shard_map(
        inner,
        mesh=mesh,
        in_specs=(param_specs(params, cfg, size), kv_specs, P()),
        out_specs=(kv_specs, P()),
        check_vma=False,
    )
