"""On-device token sampling with per-row parameters.

Each row has its own temperature (0 = greedy), top-k (-1 = off), top-p, min-p, seed and output
position. The random key of a row is ``fold_in(PRNGKey(seed), position)``, so a seeded request
draws the same tokens whatever else shares its batch or however often it was preempted.

Filters need no sort of the vocabulary: the top-k and top-p cut-offs are thresholds found by
bisection (a few dozen masked reductions over [S, V]), which is cheaper than a per-row sort
on every backend and far cheaper on CPU. There is no data-dependent control flow (the loop is
unrolled, no ``lax.cond``): on GPU either would make XLA read a predicate back to the host and
so block the dispatching thread. Whether a batch needs the draw or the filters at all is the
caller's static choice (the runner compiles one selector per case).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_jax.model.layers import argmax_last

_BISECT_STEPS = 40  # halvings of the search interval: far below f32 resolution of logits


def _row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    # seeds: u32[S]; positions: i32[S] -> keys[S]
    def one(seed: jax.Array, pos: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(seed), pos)

    return jax.vmap(one)(seeds, positions)


def _largest_threshold(values: jax.Array, lo: jax.Array, hi: jax.Array, enough) -> jax.Array:
    """Per row, the largest t in [lo, hi] with ``enough(values >= t)`` true (bisection).

    values: f32[S, V]; lo, hi: f32[S] with enough(values >= lo) true -> f32[S]
    """

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = enough(values >= mid[:, None])
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, _BISECT_STEPS, body, (lo, hi), unroll=True)
    return lo


def filter_logits(
    logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array
) -> jax.Array:
    """Set filtered-out entries to -inf: top-k, then min-p and top-p on the top-k distribution.

    logits f32[S, V]; top_k i32[S] (<= 0: off); top_p, min_p f32[S] -> f32[S, V]
    """
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    row_min, row_max = jnp.min(logits, axis=-1), jnp.max(logits, axis=-1)
    kth = _largest_threshold(
        logits, row_min, row_max, lambda keep: jnp.sum(keep, axis=-1) >= k
    )  # the k-th largest logit (ties keep a few more)
    keep = logits >= kth[:, None]
    probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
    max_prob = jnp.max(probs, axis=-1)
    keep &= probs >= (min_p * max_prob)[:, None]
    # top-p: the smallest set of most likely tokens holding at least top_p of the mass
    p_cut = _largest_threshold(
        probs,
        jnp.zeros_like(max_prob),
        max_prob,
        lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=-1) >= top_p * (1 - 1e-6),
    )
    keep &= (probs >= p_cut[:, None]) | (top_p >= 1.0)[:, None]
    return jnp.where(keep, logits, -jnp.inf)


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    min_p: jax.Array,
    seeds: jax.Array,
    positions: jax.Array,
    *,
    use_filter: bool = True,
) -> jax.Array:
    """Sample one token per row (rows with temperature 0 take the argmax). ``use_filter=False``
    skips top-k / top-p / min-p, for batches where no sampled row sets them.

    logits f32[S, V]; temperature/top_p/min_p f32[S]; top_k i32[S]; seeds u32[S];
    positions i32[S] -> i32[S]
    """
    greedy_ids = argmax_last(logits)
    is_greedy = temperature <= 0.0
    scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
    if use_filter:
        scaled = filter_logits(scaled, top_k, top_p, min_p)
    keys = _row_keys(seeds, positions)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(is_greedy, greedy_ids, sampled)
