"""On-device token sampling with per-row parameters.

Each row has its own temperature (0 = greedy), top-k (-1 = off), top-p, min-p, seed and output
position. The random key of a row is ``fold_in(PRNGKey(seed), position)``, so a seeded request
draws the same tokens whatever else shares its batch or however often it was preempted.
The full-vocabulary sort needed by top-k/top-p/min-p runs only when some row asks for them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    # seeds: u32[S]; positions: i32[S] -> keys[S]
    def one(seed: jax.Array, pos: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(seed), pos)

    return jax.vmap(one)(seeds, positions)


def _filter_sorted(
    sorted_logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> jax.Array:
    # sorted_logits: f32[S, V] descending; returns them with filtered entries at -inf
    vocab = sorted_logits.shape[-1]
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    keep &= probs >= min_p[:, None] * probs[:, :1]
    # top-p: keep a token if the mass strictly before it is below top_p (the first always stays)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p[:, None]
    return jnp.where(keep, sorted_logits, -jnp.inf)


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    seeds: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """Sample one token per row.

    logits f32[S, V]; temperature/top_p/min_p f32[S]; top_k i32[S]; seeds u32[S];
    positions i32[S] -> i32[S]
    """
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = temperature <= 0.0
    scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
    keys = _row_keys(seeds, positions)
    needs_filter = jnp.any(~is_greedy & ((top_k > 0) | (top_p < 1.0) | (min_p > 0.0)))

    def filtered() -> jax.Array:
        order = jnp.argsort(-scaled, axis=-1)  # i32[S, V]
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        choice = jax.vmap(jax.random.categorical)(
            keys, _filter_sorted(sorted_logits, top_k, top_p, min_p)
        )
        return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    def plain() -> jax.Array:
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    sampled = jax.lax.cond(needs_filter, filtered, plain)
    return jnp.where(is_greedy, greedy_ids, sampled)
