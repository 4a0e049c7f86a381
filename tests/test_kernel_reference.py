"""The jnp reference against the float64 oracle: the sweep, sliding window, soft cap, write_kv."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import (
    CaseSpec,
    assert_close,
    decode_spec,
    make_case,
    mixed_spec,
    oracle,
    spec_id,
    sweep_specs,
)

from paged_jax.kernels import reference
from paged_jax.kernels.reference import ReferenceBlockSizes

SWEEP = sweep_specs()
# The rest of the contract's sweep, one case each: page sizes 32 and 64, GQA ratios 3 and 8.
COVERAGE = sweep_specs(page_sizes=(32, 64), gqa=((9, 3), (8, 1)), head_dims=(64,),
                       dtypes=("float32",), pages_per_seq=3)  # fmt: skip


def _check(spec: CaseSpec, **kwargs) -> None:
    case = make_case(spec)
    out = reference.ragged_paged_attention(*case.args(), **case.kwargs(), **kwargs)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert_close(out, oracle(case), spec.dtype)
    padding = np.asarray(out)[int(case.cu_q_lens[-1]) :]
    assert (padding == 0).all()


@pytest.mark.parametrize("spec", SWEEP + COVERAGE, ids=spec_id)
def test_sweep(spec: CaseSpec) -> None:
    _check(spec)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
@pytest.mark.parametrize("make", [mixed_spec, decode_spec])
def test_sliding_window(make, window: int) -> None:
    _check(make(16, 8, 2, 64, "float32", sliding_window=window, seed=window))


@pytest.mark.parametrize("soft_cap", [1.0, 30.0])
def test_soft_cap(soft_cap: float) -> None:
    _check(mixed_spec(8, 4, 2, 64, "float32", soft_cap=soft_cap, seed=7))
    _check(mixed_spec(8, 4, 2, 64, "bfloat16", soft_cap=soft_cap, sliding_window=9, seed=8))


@pytest.mark.parametrize("block_q,block_kv", [(1, 1), (4, 16), (64, 1024)])
def test_block_sizes_do_not_change_results(block_q: int, block_kv: int) -> None:
    spec = mixed_spec(8, 8, 2, 64, "float32", pages_per_seq=6, seed=3)
    _check(spec, block_sizes=ReferenceBlockSizes(block_q=block_q, block_kv=block_kv))


@pytest.mark.parametrize("block_q,block_kv", [(4, 16), (16, 16), (16, 1024)])
def test_decode_only_paths(block_q: int, block_kv: int) -> None:
    # decode_only skips the one-sequence test; (16, 1024): one block, one kv step, no loops.
    spec = decode_spec(16, 8, 2, 64, "float32", num_seqs=12, pages_per_seq=6, seed=5)
    sizes = ReferenceBlockSizes(block_q=block_q, block_kv=block_kv)
    _check(spec, decode_only=True, block_sizes=sizes)


def test_long_prefill_chunk_single_sequence() -> None:
    # Blocks fully inside one sequence take the shared-gather path.
    spec = CaseSpec(16, 4, 1, 64, "float32", kv_lens=(100, 70), q_lens=(60, 70), pages_per_seq=8)
    _check(spec)


def test_jit_with_traced_metadata() -> None:
    case = make_case(mixed_spec(8, 4, 2, 64, "float32", seed=11))
    fn = jax.jit(lambda *a: reference.ragged_paged_attention(*a, sm_scale=case.sm_scale))
    assert_close(fn(*case.args()), oracle(case), "float32")


def test_rejects_bad_shapes() -> None:
    case = make_case(decode_spec(8, 4, 2, 64, "float32"))
    q, k, v, kv_lens, tables, cu, n = case.args()
    with pytest.raises(ValueError, match="num_q_heads"):
        reference.ragged_paged_attention(q[:, :3], k, v, kv_lens, tables, cu, n, sm_scale=1.0)
    with pytest.raises(ValueError, match="cu_q_lens"):
        reference.ragged_paged_attention(q, k, v, kv_lens, tables, cu[:-1], n, sm_scale=1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        reference.ragged_paged_attention(
            q, k, v, kv_lens, tables, cu, n, sm_scale=1.0, sliding_window=0
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_kv(dtype: str) -> None:
    rng = np.random.default_rng(0)
    hkv, num_pages, ps, d, t = 2, 6, 4, 8, 7
    k_pages = rng.standard_normal((hkv, num_pages, ps, d)).astype(dtype)
    v_pages = rng.standard_normal((hkv, num_pages, ps, d)).astype(dtype)
    k_new = rng.standard_normal((t, hkv, d)).astype(dtype)
    v_new = rng.standard_normal((t, hkv, d)).astype(dtype)
    slots = rng.permutation(np.arange(ps, num_pages * ps))[: t - 2]  # skip NULL_PAGE
    slots = np.concatenate([slots, [0, 1]]).astype(np.int32)  # two padding tokens -> page 0
    k_out, v_out = jax.jit(reference.write_kv, donate_argnums=(0, 1))(
        jnp.asarray(k_pages), jnp.asarray(v_pages), k_new, v_new, slots
    )
    k_exp, v_exp = k_pages.copy(), v_pages.copy()
    for i, slot in enumerate(slots):
        k_exp[:, slot // ps, slot % ps] = k_new[i]
        v_exp[:, slot // ps, slot % ps] = v_new[i]
    np.testing.assert_array_equal(np.asarray(k_out), k_exp)
    np.testing.assert_array_equal(np.asarray(v_out), v_exp)


def test_write_then_attend_matches_oracle() -> None:
    # The engine's order: write the step's new K/V, then attend over the pages.
    spec = mixed_spec(8, 4, 2, 64, "float32", seed=5)
    case = make_case(spec)
    rng = np.random.default_rng(1)
    q, k, v, kv_lens, tables, cu, n = case.args()
    t = int(case.cu_q_lens[-1])
    slots = []
    for s in range(int(case.num_seqs[0])):
        q_len = int(case.cu_q_lens[s + 1] - case.cu_q_lens[s])
        for p in range(int(case.kv_lens[s]) - q_len, int(case.kv_lens[s])):
            slots.append(
                int(case.page_tables[s, p // spec.page_size]) * spec.page_size + p % spec.page_size
            )
    slots += [0] * (case.q.shape[0] - t)
    k_new = rng.standard_normal((case.q.shape[0], spec.num_kv_heads, spec.head_dim), np.float32)
    v_new = rng.standard_normal(k_new.shape, np.float32)
    k2, v2 = reference.write_kv(k, v, k_new, v_new, jnp.asarray(slots, jnp.int32))
    new_case = dataclasses.replace(case, k_pages=np.asarray(k2), v_pages=np.asarray(v2))
    out = reference.ragged_paged_attention(q, k2, v2, kv_lens, tables, cu, n, **case.kwargs())
    assert_close(out, oracle(new_case), "float32")


def test_dtype_out_matches_q() -> None:
    case = make_case(decode_spec(8, 4, 4, 64, "bfloat16"))
    out = reference.ragged_paged_attention(*case.args(), sm_scale=case.sm_scale)
    assert out.dtype == jnp.bfloat16
