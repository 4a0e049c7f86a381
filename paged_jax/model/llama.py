"""The Llama-family transformer, top to bottom, as pure functions over a parameter pytree.

Covers Llama 1/2/3 (llama3 RoPE scaling), Mistral (no window), Qwen2 (qkv bias) and Qwen3
(q/k RMSNorm). Tokens arrive packed: ``token_ids i32[T]`` with their absolute ``positions``.
Attention is a callback so one model file serves both the dense path here (each sequence on its
own, causal) and the paged path (``runtime/``), which writes K/V into pages and calls the
ragged paged attention kernel.

Parameter pytree (per-layer dicts, so a layer's weights are separate buffers that the paged
step can read without slicing a stacked array):
    embed      [V, D]                    final_norm [D]          lm_head [D, V] (untied only)
    layers[l]: attn_norm [D]  wqkv [D, (Hq + 2 Hkv) Dh]  bqkv [(Hq + 2 Hkv) Dh] (qkv_bias)
               q_norm [Dh] k_norm [Dh] (qk_norm)  wo [Hq Dh, D]  bo [D] (o_bias)
               mlp_norm [D]  w_gate_up [D, 2 F]  w_down [F, D]
Letters: T tokens, D hidden, F ffn, V vocab, Hq/Hkv heads, Dh head_dim, B batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from paged_jax.model.config import ModelConfig, llama3_inv_freq_scale

Params = dict[str, Any]
# attn_fn(layer, q [T, Hq, Dh], k [T, Hkv, Dh], v [T, Hkv, Dh], cache) -> (out [T, Hq, Dh], cache)
AttnFn = Callable[[int, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # x: [..., N]; normalise in f32, scale in the input dtype (as HF does)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    # f32[Dh // 2], computed in f32 like the reference implementations
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_scaling is not None:
        inv_freq = np.asarray(llama3_inv_freq_scale(cfg.rope_scaling, inv_freq.tolist()))
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / np.asarray(cfg.rope_freq_factors)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    # x: [T, H, Dh]; positions: i32[T]; rotate-half (NeoX) layout
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, Dh/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def forward(
    params: Params,
    cfg: ModelConfig,
    token_ids: jax.Array,
    positions: jax.Array,
    cache: Any,
    attn_fn: AttnFn,
    all_reduce: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, Any]:
    """Run the decoder over packed tokens. Returns the final-normed hidden states and cache.

    ``all_reduce`` sums the partial outputs of ``wo`` and ``w_down`` across tensor-parallel
    shards (``runtime/tp.py``: each shard holds some heads and FFN columns); None: one device.
    """
    # token_ids, positions: i32[T] -> hidden [T, D]
    num_tokens = token_ids.shape[0]
    inv_freq = rope_inv_freq(cfg)
    reduce = all_reduce or (lambda y: y)
    x = params["embed"][token_ids]  # [T, D]
    for layer_idx, layer in enumerate(params["layers"]):
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        qkv = h @ layer["wqkv"]  # [T, (Hq + 2 Hkv) Dh]
        if cfg.qkv_bias:
            qkv = qkv + layer["bqkv"]
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        attn, cache = attn_fn(layer_idx, q, k, v, cache)  # [T, Hq, Dh]
        o = reduce(attn.reshape(num_tokens, cfg.q_size) @ layer["wo"])
        if cfg.o_bias:
            o = o + layer["bo"]
        x = x + o
        h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
        gate, up = jnp.split(h @ layer["w_gate_up"], 2, axis=-1)  # [T, F] each
        x = x + reduce((jax.nn.silu(gate) * up) @ layer["w_down"])
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cache


def compute_logits(params: Params, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    # hidden: [N, D] -> f32[N, V]
    if cfg.tie_word_embeddings:
        # [V, D] @ [D, N] keeps the big operand untransposed (2x faster on XLA:CPU than h @ E.T)
        logits = (params["embed"] @ hidden.T).T
    else:
        logits = hidden @ params["lm_head"]
    return logits.astype(jnp.float32)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sm_scale: float) -> jax.Array:
    # q: [T, Hq, Dh]; k, v: [T, Hkv, Dh] of ONE sequence at positions 0..T-1 -> [T, Hq, Dh]
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    qg = q.reshape(num_tokens, k.shape[1], group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k.astype(jnp.float32)) * sm_scale
    mask = jnp.tril(jnp.ones((num_tokens, num_tokens), dtype=bool))
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", probs, v.astype(jnp.float32))
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def dense_logits(params: Params, cfg: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """Logits at every position of each row, no cache: the reference path. i32[B, T] -> [B, T, V]"""
    sm_scale = cfg.head_dim**-0.5

    def attn_fn(layer: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any):
        return causal_attention(q, k, v, sm_scale), cache

    def one(ids: jax.Array) -> jax.Array:
        positions = jnp.arange(ids.shape[0], dtype=jnp.int32)
        hidden, _ = forward(params, cfg, ids, positions, None, attn_fn)
        return compute_logits(params, cfg, hidden)

    return jax.vmap(one)(token_ids)


def greedy_matches(
    params: Params, cfg: ModelConfig, prompt_ids: list[int], continuation: list[int]
) -> bool:
    """Whether greedy decoding from ``prompt_ids`` yields ``continuation``: one teacher-forced
    forward whose argmax at each step must be the next token (equivalent, and far cheaper)."""
    ids = jnp.asarray(list(prompt_ids) + list(continuation), dtype=jnp.int32)
    logits = dense_logits(params, cfg, ids[None])[0]  # [T, V]
    start = len(prompt_ids) - 1
    predicted = jnp.argmax(logits[start : start + len(continuation)], axis=-1)
    return predicted.tolist() == list(continuation)
