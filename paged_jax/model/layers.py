"""Layers shared by every model family: RMSNorm (plain and Gemma's ``1 + w``), RoPE (default,
linear, llama3 and GGUF frequency factors), gated MLPs (SwiGLU, GeGLU), the lm head with an
optional final soft cap, and a dense causal attention (window and soft cap) for the no-cache
reference path; the on-device normal draws of random-weight presets; and the row maps that
run a family's per-token blocks either on all rows at once or in fixed-size row tiles (the
engine's batch-invariant mode).

Letters: T tokens, D hidden, F ffn, V vocab, Hq/Hkv heads, Dh head_dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.model.config import (
    AttentionSpec,
    LinearRopeScaling,
    Llama3RopeScaling,
    llama3_inv_freq_scale,
)

# rows(fn, *xs): fn applied to the leading (token) axis of the pytrees xs, rows independent
RowMap = Callable[..., Any]


def all_rows(fn: Callable[..., Any], *xs: Any) -> Any:
    """The plain row map: ``fn`` on every row at once (XLA picks the kernels for the shape)."""
    return fn(*xs)


def row_tiles(tile: int) -> RowMap:
    """A row map that runs ``fn`` on ``tile`` rows at a time, one tile after the other.

    Every call of ``fn`` then has the same shapes whatever the number of rows, so XLA compiles
    the same kernels (same tiles, same reduction order) for a 1-token decode and a 2048-token
    chunk, and a row's result does not depend on the rows packed with it: the batch-invariant
    mode. Optimization barriers keep the tile's computation from fusing with what surrounds it
    (which could differ between step buckets). Rows past the last are zero padding."""

    def rows(fn: Callable[..., Any], *xs: Any) -> Any:
        leaves, tree = jax.tree.flatten(xs)
        num_rows = leaves[0].shape[0]
        num_tiles = -(-num_rows // tile)
        pad = num_tiles * tile - num_rows

        def split(x: jax.Array) -> jax.Array:  # [N, ...] -> [num_tiles, tile, ...]
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
            return x.reshape(num_tiles, tile, *x.shape[1:])

        def body(tile_leaves: list[jax.Array]) -> Any:
            args = jax.tree.unflatten(tree, jax.lax.optimization_barrier(tile_leaves))
            return jax.lax.optimization_barrier(fn(*args))

        out = jax.lax.map(body, [split(x) for x in leaves])
        return jax.tree.map(lambda y: y.reshape(num_tiles * tile, *y.shape[2:])[:num_rows], out)

    return rows


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def normal_drawer(
    num_keys: int, dtype: jnp.dtype, seed: int = 0
) -> Callable[[tuple[int, ...]], jax.Array]:
    """``normal(shape)``: the next of ``num_keys`` draws (std 0.02) made on device in ``dtype``;
    one compile per distinct shape, so a 8B-shaped model needs no host copy."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), num_keys))
    return lambda shape: _normal(next(keys), shape, jnp.dtype(dtype))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # x: [..., N]; normalise in f32, scale in the input dtype (as HF Llama does)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rms_norm_unit_offset(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # x: [..., N]; Gemma: scale by (1 + w), all in f32, then cast (as HF Gemma3RMSNorm does)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(
    head_dim: int, spec: AttentionSpec, freq_factors: tuple[float, ...] | None = None
) -> np.ndarray:
    # f32[Dh // 2], computed in f32 like the reference implementations
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(spec.rope_theta) ** exponents)).astype(np.float32)
    if isinstance(spec.rope_scaling, Llama3RopeScaling):
        inv_freq = np.asarray(llama3_inv_freq_scale(spec.rope_scaling, inv_freq.tolist()))
    elif isinstance(spec.rope_scaling, LinearRopeScaling):
        inv_freq = inv_freq / np.float32(spec.rope_scaling.factor)
    if freq_factors is not None:
        inv_freq = inv_freq / np.asarray(freq_factors)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    # x: [T, H, Dh]; positions: i32[T]; rotate-half (NeoX) layout
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, Dh/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def gated_mlp(h: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, act: str) -> jax.Array:
    # h: [T, D]; w_gate_up: [D, 2F] (gate columns first); w_down: [F, D] -> [T, D]
    gate, up = jnp.split(h @ w_gate_up, 2, axis=-1)  # [T, F] each
    return (ACTIVATIONS[act](gate) * up) @ w_down


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def argmax_last(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` as i32 (first index of the max; a NaN counts as the max, as
    in argmax), in two plain reductions: XLA CPU runs argmax's variadic reduce scalar, 4x
    slower over a vocabulary."""
    # x: f32[..., V] -> i32[...]
    top = jnp.max(x, axis=-1, keepdims=True)  # NaN if the row holds one
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hit = (x == top) | jnp.isnan(x)
    return jnp.min(jnp.where(hit, iota, x.shape[-1]), axis=-1)


def lm_head_logits(
    params: dict, hidden: jax.Array, *, tied: bool, final_soft_cap: float | None = None
) -> jax.Array:
    # hidden: [N, D] -> f32[N, V]
    if tied:
        # [V, D] @ [D, N] keeps the big operand untransposed (2x faster on XLA:CPU than h @ E.T)
        logits = (params["embed"] @ hidden.T).T
    else:
        logits = hidden @ params["lm_head"]
    return soft_cap(logits.astype(jnp.float32), final_soft_cap)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec) -> jax.Array:
    # q: [T, Hq, Dh]; k, v: [T, Hkv, Dh] of ONE sequence at positions 0..T-1 -> [T, Hq, Dh]
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    qg = q.reshape(num_tokens, k.shape[1], group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k.astype(jnp.float32)) * spec.sm_scale
    scores = soft_cap(scores, spec.soft_cap)
    pos = jnp.arange(num_tokens)
    mask = pos[None, :] <= pos[:, None]  # [T(q), T(kv)]
    if spec.sliding_window is not None:
        mask &= pos[None, :] > pos[:, None] - spec.sliding_window
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", probs, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
