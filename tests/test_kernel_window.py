"""Sliding window and soft cap, kernel by kernel, against the float64 dense oracle with NaN pages.

The matrix: windows smaller than, equal to and larger than a page (and spanning several), with
prefill chunks that straddle the window edge (the chunk's first rows still see a page its last
rows no longer see), decode rows just inside / outside, and the Gemma 3 head shape (head_dim 256,
one kv head). The reference runs the whole matrix; TPU interpret mode (about 1 ms per DMA) and
the GPU kernel's interpret mode one case each (test_kernel_{tpu,gpu}.py hold more); a GPU runs
three (``-m gpu``: each window is a static kernel argument, so each case is a ~10 s compile):
a window of one token, a window past a page with soft cap in bf16, and the Gemma 3 shape.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from kernel_cases import CaseSpec, assert_close, make_case, oracle, spec_id

from paged_jax.kernels import gpu, gpu_hopper, reference, tpu

PAGE = 8


def window_spec(window: int, *, soft_cap: float | None = None, seed: int = 0, **kw) -> CaseSpec:
    """Sequences placed around the window edge: a decode row at kv_len == window and one just
    past it, a chunk whose rows straddle ``pos - window`` across a page boundary, a chunk
    longer than the window, and a whole prefill."""
    w = window
    kv_lens = (w, w + 1, w + PAGE + 3, 2 * w + 5, w + 2)
    q_lens = (1, 1, PAGE + 2, w + 3, w + 2)
    pages = -(-max(kv_lens) // PAGE)
    args = dict(page_size=PAGE, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype="float32")
    args.update(kw)
    return CaseSpec(
        **args, kv_lens=kv_lens, q_lens=q_lens, pages_per_seq=pages + 1,
        sliding_window=window, soft_cap=soft_cap, seed=seed,
    )  # fmt: skip


WINDOWS = [1, PAGE - 3, PAGE, PAGE + 5, 3 * PAGE + 1]  # < = > a page, several pages
MATRIX = [window_spec(w, seed=w) for w in WINDOWS] + [
    window_spec(PAGE, soft_cap=5.0, seed=1),
    window_spec(PAGE + 5, soft_cap=50.0, dtype="bfloat16", seed=2),
    # Gemma 3's shape: head_dim 256, 4 q heads over 1 kv head
    window_spec(2 * PAGE, num_q_heads=4, num_kv_heads=1, head_dim=256, seed=3),
]


def _check(fn, spec: CaseSpec, **kwargs) -> None:
    case = make_case(spec)
    out = fn(*case.args(), **case.kwargs(), **kwargs)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    expected = oracle(case)
    assert_close(out, expected, spec.dtype)
    assert (np.asarray(out)[int(case.cu_q_lens[-1]) :] == 0).all()
    if spec.sliding_window is not None:  # the window must matter in every case
        full = oracle(make_case(dataclasses.replace(spec, sliding_window=None)))
        assert np.abs(full - expected).max() > 1e-3


@pytest.mark.parametrize("spec", MATRIX, ids=spec_id)
def test_reference(spec: CaseSpec) -> None:
    _check(reference.ragged_paged_attention, spec)


@pytest.mark.parametrize("spec", [MATRIX[5]], ids=spec_id)
def test_tpu_interpret(spec: CaseSpec) -> None:
    _check(tpu.ragged_paged_attention, spec, interpret=pltpu.InterpretParams())


@pytest.mark.parametrize("spec", [MATRIX[3]], ids=spec_id)
def test_gpu_interpret(spec: CaseSpec) -> None:
    _check(gpu.ragged_paged_attention, spec, interpret=True)


def test_hopper_prefill_declines_window_and_soft_cap() -> None:
    """The Mosaic GPU (Hopper) prefill has no window or soft cap: the dispatch in gpu.py asks
    ``supported`` and sends such calls to the Triton path."""
    import jax.numpy as jnp

    assert not gpu_hopper.supported(jnp.bfloat16, 128, 16, 512, None)
    assert not gpu_hopper.supported(jnp.bfloat16, 128, 16, None, 50.0)


needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("spec", [MATRIX[0], MATRIX[6], MATRIX[7]], ids=spec_id)
def test_gpu(spec: CaseSpec) -> None:
    _check(gpu.ragged_paged_attention, spec)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("window", [None, 512])
def test_gpu_gemma3_shape_long_prefill(window: int | None) -> None:
    """Gemma 3 270M's attention shape (bf16, head_dim 256, GQA 4) with a 1.5k-token prefill:
    the window path through the full dispatch (Hopper prefill declines it, Triton serves it)."""
    spec = CaseSpec(
        page_size=16, num_q_heads=4, num_kv_heads=1, head_dim=256, dtype="bfloat16",
        kv_lens=(1500, 700, 513), q_lens=(1500, 1, 200), pages_per_seq=96,
        sliding_window=window, seed=11,
    )  # fmt: skip
    case = make_case(spec)
    out = gpu.ragged_paged_attention(*case.args(), **case.kwargs())
    assert_close(out, oracle(case), spec.dtype)
