"""The sampler's filters against a sort-based numpy oracle, and its per-row behaviour."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax.model.layers import argmax_last
from paged_jax.model.sampler import filter_logits, sample


def _oracle_keep(logits: np.ndarray, k: int, top_p: float, min_p: float) -> np.ndarray:
    """The kept set by sorting: top-k, then min-p and top-p on the top-k distribution."""
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(logits.shape, bool)
    kept = order[: k if k > 0 else len(logits)]
    probs = np.exp(logits[kept] - logits[kept].max())
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    ok = (probs >= min_p * probs.max()) & ((mass_before < top_p) | (top_p >= 1.0))
    keep[kept[ok]] = True
    return keep


@pytest.mark.parametrize(
    "top_k, top_p, min_p",
    [(1, 1.0, 0.0), (5, 1.0, 0.0), (-1, 0.9, 0.0), (50, 0.5, 0.0), (-1, 1.0, 0.1),
     (20, 0.8, 0.05), (-1, 0.01, 0.0), (1000, 0.999, 0.0)],
)  # fmt: skip
def test_filter_matches_sorting_oracle(top_k, top_p, min_p):
    rng = np.random.default_rng(top_k + int(100 * top_p))
    logits = (rng.standard_normal((4, 3000)) * rng.uniform(0.5, 4, (4, 1))).astype(np.float32)
    out = np.asarray(
        filter_logits(
            jnp.asarray(logits),
            jnp.full(4, top_k, jnp.int32),
            jnp.full(4, top_p, jnp.float32),
            jnp.full(4, min_p, jnp.float32),
        )
    )
    for row in range(4):
        want = _oracle_keep(logits[row], top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(out[row]), want)
        np.testing.assert_array_equal(out[row][want], logits[row][want])


def _sample(logits, temperature, top_k=-1, top_p=1.0, min_p=0.0, seeds=None, positions=None):
    n = logits.shape[0]
    return np.asarray(
        sample(
            jnp.asarray(logits),
            jnp.full(n, temperature, jnp.float32) if np.isscalar(temperature) else temperature,
            jnp.full(n, top_k, jnp.int32),
            jnp.full(n, top_p, jnp.float32),
            jnp.full(n, min_p, jnp.float32),
            jnp.arange(n, dtype=jnp.uint32) if seeds is None else seeds,
            jnp.zeros(n, jnp.int32) if positions is None else positions,
        )
    )


def test_greedy_rows_and_filtered_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 500)).astype(np.float32)
    np.testing.assert_array_equal(_sample(logits, 0.0), logits.argmax(-1))
    np.testing.assert_array_equal(_sample(logits, 1.0, top_k=1), logits.argmax(-1))
    # top-k 3 at a high temperature: only ever one of the 3 largest, and not always the first
    got = _sample(logits, 5.0, top_k=3)
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    assert all(g in t for g, t in zip(got, top3, strict=True))
    assert (got != logits.argmax(-1)).sum() > 10
    # mixed rows: greedy rows stay greedy next to sampled ones
    temps = jnp.asarray(np.where(np.arange(64) % 2 == 0, 0.0, 1.0), jnp.float32)
    mixed = _sample(logits, temps)
    np.testing.assert_array_equal(mixed[::2], logits.argmax(-1)[::2])


def test_seed_and_position_determine_the_draw():
    logits = np.zeros((3, 1000), np.float32)  # uniform: the key alone decides
    seeds = jnp.asarray([7, 7, 8], jnp.uint32)
    positions = jnp.asarray([3, 3, 3], jnp.int32)
    a = _sample(logits, 1.0, seeds=seeds, positions=positions)
    assert a[0] == a[1] and a[0] != a[2]
    b = _sample(logits[:1], 1.0, seeds=seeds[:1], positions=positions[:1])
    assert b[0] == a[0]  # the same row alone gives the same token
    c = _sample(logits[:1], 1.0, seeds=seeds[:1], positions=jnp.asarray([4], jnp.int32))
    assert c[0] != a[0]


def test_without_filters_the_draw_is_the_same():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((16, 300)).astype(np.float32))
    n = logits.shape[0]
    args = (
        logits,
        jnp.asarray(np.where(np.arange(n) % 3 == 0, 0.0, 0.7), jnp.float32),
        jnp.full(n, -1, jnp.int32),
        jnp.ones(n, jnp.float32),
        jnp.zeros(n, jnp.float32),
        jnp.arange(n, dtype=jnp.uint32),
        jnp.arange(n, dtype=jnp.int32),
    )
    filtered = np.asarray(sample(*args, use_filter=True))
    plain = np.asarray(sample(*args, use_filter=False))
    np.testing.assert_array_equal(filtered, plain)
    assert (plain != np.asarray(logits).argmax(-1)).sum() > 4  # it did sample


def test_argmax_last_matches_numpy_argmax():
    """Ties take the first index, a NaN counts as the max, as in numpy's argmax."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, 10] = x[1, 700] = 50.0  # a tie: the first wins
    x[2, 5] = x[2, 9] = np.nan  # the first NaN wins
    x[3, :] = -np.inf  # all masked: index 0
    x[4, -1] = np.inf
    got = np.asarray(argmax_last(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    assert got.dtype == np.int32
