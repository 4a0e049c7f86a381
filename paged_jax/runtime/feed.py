"""Async scheduling on the device: a step's input tokens taken from the previous step's samples.

With ``async_scheduling`` the host plans and packs step n + 1 while the device still runs step
n, so a sequence that samples in step n has no known input token for step n + 1 (the host put
``engine.sequence.PLACEHOLDER`` there). Two tiny executables fill it in on the device, with
no round trip: ``widen`` copies step n's sampled ids i32[S] into a fixed i32[S_max] (one
compile per sequence bucket rather than one per pair of buckets), and ``feed`` replaces each
token whose source row is >= 0 by that row's sample (one compile per token bucket). After a
decode burst a row's last sample is that of its own last step: ``keep_last`` tracks it over
the burst's steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def widen(sampled: jax.Array, *, size: int) -> jax.Array:
    """sampled i32[S] -> i32[size] (zeros past S)."""
    return jnp.zeros(size, jnp.int32).at[: sampled.shape[0]].set(sampled.astype(jnp.int32))


def feed(token_ids: jax.Array, source_rows: jax.Array, previous: jax.Array) -> jax.Array:
    """token_ids i32[T] with token i replaced by previous[source_rows[i]] where that is >= 0.

    source_rows i32[T] (-1: keep the packed token); previous i32[S_max] (``widen``'s).
    """
    fed = previous[jnp.maximum(source_rows, 0)]
    return jnp.where(source_rows >= 0, fed, token_ids)


def keep_last(last: jax.Array, sampled: jax.Array, step: jax.Array, num_steps: jax.Array):
    """A burst's latest sample per row: ``sampled`` (step ``step``'s, i32[S]) where the row
    still computes that step (step < num_steps i32[S]), else ``last`` i32[S]."""
    return jnp.where(step < num_steps, sampled, last)
