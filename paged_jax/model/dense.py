"""The no-cache reference path of every family: logits at every position, each row causal on its
own, with each layer's attention spec (window, scale, soft cap). Tests, training and eval use it
as the yardstick the paged engine must match."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from paged_jax.model.config import ModelConfig
from paged_jax.model.layers import causal_attention
from paged_jax.model.registry import family_of

Params = dict[str, Any]


def dense_logits(params: Params, cfg: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """Logits at every position of each row, no cache: the reference path. i32[B, T] -> [B, T, V]"""
    family = family_of(cfg)
    specs = cfg.attention_specs()

    def attn_fn(layer: int, q: jax.Array, k: jax.Array, v: jax.Array, cache: Any):
        return causal_attention(q, k, v, specs[layer]), cache

    def one(ids: jax.Array) -> jax.Array:
        positions = jnp.arange(ids.shape[0], dtype=jnp.int32)
        hidden, _ = family.forward(params, cfg, ids, positions, None, attn_fn)
        return family.compute_logits(params, cfg, hidden)

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
