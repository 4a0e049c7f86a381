"""The Pallas Mosaic TPU kernel: TPU interpret mode on CPU against the oracle, and a lowering check.

Interpret mode simulates DMAs and semaphores, fills fresh VMEM with NaN and raises on
out-of-bounds reads; cases stay small (about 1 ms per DMA). The lowering check runs the Mosaic
TPU lowering through `jax.export` on CPU, which enforces the block-shape tiling rules that
interpret mode does not.
"""

from __future__ import annotations

import functools
import itertools

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_cases import (
    CaseSpec,
    assert_close,
    decode_spec,
    make_case,
    mixed_spec,
    oracle,
    spec_id,
)

from paged_jax.kernels import tpu

INTERPRET_SPECS = [
    decode_spec(16, 8, 2, 64, "float32", num_seqs=4, pages_per_seq=3, seed=1),
    mixed_spec(16, 4, 2, 128, "bfloat16", pages_per_seq=3, seed=2),
    mixed_spec(16, 4, 1, 64, "float32", pages_per_seq=3, sliding_window=9, soft_cap=10.0),
    CaseSpec(8, 2, 2, 64, "float32", kv_lens=(40, 7), q_lens=(23, 7), pages_per_seq=6, seed=4),
    decode_spec(32, 9, 3, 64, "float32", num_seqs=2, pages_per_seq=2, seed=5),  # GQA 3
    decode_spec(64, 8, 1, 64, "float32", num_seqs=2, pages_per_seq=2, seed=6),  # GQA 8
]


@pytest.mark.parametrize("spec", INTERPRET_SPECS, ids=spec_id)
def test_interpret(spec: CaseSpec) -> None:
    case = make_case(spec)
    out = tpu.ragged_paged_attention(
        *case.args(), **case.kwargs(), interpret=pltpu.InterpretParams()
    )
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert_close(out, oracle(case), spec.dtype)
    assert (np.asarray(out)[int(case.cu_q_lens[-1]) :] == 0).all()


def test_rejects_bad_block_q() -> None:
    case = make_case(decode_spec(16, 4, 2, 64, "float32"))
    with pytest.raises(ValueError, match="block_q"):
        tpu.ragged_paged_attention(
            *case.args(), **case.kwargs(), block_sizes=tpu.TpuBlockSizes(block_q=12)
        )


LOWERING_MATRIX = list(itertools.product((64, 128), (16, 32, 64), ("bfloat16", "float32")))


@pytest.mark.parametrize("head_dim,page_size,dtype", LOWERING_MATRIX)
def test_tpu_lowering(head_dim: int, page_size: int, dtype: str) -> None:
    case = make_case(mixed_spec(page_size, 8, 2, head_dim, dtype, pages_per_seq=3))
    fn = jax.jit(functools.partial(tpu.ragged_paged_attention, **case.kwargs()))
    exported = jax.export.export(fn, platforms=("tpu",))(*case.args())
    assert "tpu_custom_call" in exported.mlir_module()


def test_tpu_lowering_with_window_and_soft_cap() -> None:
    spec = mixed_spec(16, 8, 2, 128, "bfloat16", pages_per_seq=3, sliding_window=9, soft_cap=5.0)
    case = make_case(spec)
    fn = jax.jit(functools.partial(tpu.ragged_paged_attention, **case.kwargs()))
    jax.export.export(fn, platforms=("tpu",))(*case.args())


@pytest.mark.parametrize(
    "spec",
    [
        mixed_spec(16, 8, 2, 128, "float32", pages_per_seq=3, seed=11),
        mixed_spec(8, 4, 4, 64, "float32", pages_per_seq=5, seed=12),
        decode_spec(16, 8, 1, 128, "float32", num_seqs=5, pages_per_seq=3, seed=13),
    ],
    ids=spec_id,
)
def test_interpret_matches_jax_reference(spec: CaseSpec) -> None:
    """A second yardstick beside ours: JAX's own ref_ragged_paged_attention (its K/V layout:
    [P, page_size, 2 * Hkv, D], K and V interleaved on the head axis)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
        ref_ragged_paged_attention,
    )

    case = make_case(spec)
    out = tpu.ragged_paged_attention(
        *case.args(), **case.kwargs(), interpret=pltpu.InterpretParams()
    )
    k = np.transpose(case.k_pages, (1, 2, 0, 3))  # [P, page_size, Hkv, D]
    v = np.transpose(case.v_pages, (1, 2, 0, 3))
    kv = np.stack([k, v], axis=3).reshape(*k.shape[:2], 2 * k.shape[2], k.shape[3])
    live = int(case.cu_q_lens[int(case.num_seqs[0])])
    expected = ref_ragged_paged_attention(
        case.q, kv, case.kv_lens, case.page_tables, case.cu_q_lens, case.num_seqs,
        sm_scale=case.sm_scale,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out)[:live], np.asarray(expected), rtol=2e-5, atol=2e-5)
