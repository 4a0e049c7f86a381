"""The Pallas GPU kernel against the float64 oracle: interpreted on CPU, and for real on a GPU.

CPU cases run the kernel with `interpret=True` and stay small (each costs seconds). The
`gpu`-marked tests repeat the contract's full sweep on the device (pytest -m gpu).
"""

from __future__ import annotations

import dataclasses

import jax
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

from paged_jax.kernels import gpu

INTERPRET_SPECS = [
    decode_spec(8, 8, 2, 64, "float32", seed=1),
    mixed_spec(8, 4, 4, 64, "float32", seed=2),
    mixed_spec(16, 6, 1, 64, "bfloat16", seed=3),
    decode_spec(16, 8, 1, 128, "bfloat16", num_seqs=3, seed=4),
    mixed_spec(8, 8, 2, 64, "float32", sliding_window=7, soft_cap=5.0, seed=5),
    decode_spec(8, 8, 2, 64, "float32", sliding_window=10, seed=6),
    decode_spec(32, 9, 3, 64, "float32", pages_per_seq=3, seed=7),  # GQA 3, page 32
    mixed_spec(64, 8, 1, 64, "float32", pages_per_seq=2, seed=8),  # GQA 8, page 64
]


def _check(spec: CaseSpec, **kwargs) -> None:
    case = make_case(spec)
    out = gpu.ragged_paged_attention(*case.args(), **case.kwargs(), **kwargs)
    assert out.dtype == case.q.dtype and out.shape == case.q.shape
    assert_close(out, oracle(case), spec.dtype)
    assert (np.asarray(out)[int(case.cu_q_lens[-1]) :] == 0).all()


@pytest.mark.parametrize("spec", INTERPRET_SPECS, ids=spec_id)
def test_interpret(spec: CaseSpec) -> None:
    _check(spec, interpret=True)


DECODE_ONLY_SPLITS = [
    gpu.DEFAULT_BLOCK_SIZES,  # one split: padding sequences' programs zero their rows
    gpu.GpuBlockSizes(decode_kv_tokens=16, target_programs=64, max_splits=8,
                      small_batch_programs=0),  # splits: the merge zeroes them
]  # fmt: skip


@pytest.mark.parametrize("sizes", DECODE_ONLY_SPLITS, ids=("one_split", "splits"))
def test_interpret_decode_only(sizes: gpu.GpuBlockSizes) -> None:
    # T == S (a decode bucket): the chunk launch is skipped; NaN pages and padding still 0.
    spec = decode_spec(8, 8, 2, 64, "float32", num_seqs=5, pages_per_seq=8,
                       num_padding_seqs=3, num_padding_rows=3, seed=11)  # fmt: skip
    _check(spec, interpret=True, block_sizes=sizes, decode_only=True)


def test_decode_only_needs_one_row_per_sequence() -> None:
    case = make_case(decode_spec(8, 8, 2, 64, "float32", seed=12))  # T != S
    with pytest.raises(ValueError, match="decode_only needs T == S"):
        gpu.ragged_paged_attention(*case.args(), **case.kwargs(), decode_only=True)


def test_interpret_split_context() -> None:
    # Many kv splits over a long context: the split combine must be exact.
    spec = decode_spec(8, 4, 2, 64, "float32", num_seqs=2, pages_per_seq=16, seed=9)
    sizes = gpu.GpuBlockSizes(
        decode_kv_tokens=16, target_programs=64, max_splits=8, small_batch_programs=0
    )
    _check(spec, interpret=True, block_sizes=sizes)


# Tiny tiles: many q tiles per chunk and kv blocks per tile, so unmasked blocks, diagonal and
# tail blocks, sliding-window edges and zero tiles over many padding rows all occur.
SMALL_TILES = gpu.GpuBlockSizes(prefill_rows=16, prefill_kv_tokens=16, decode_kv_tokens=16)
SMALL_TILE_SIZES = {
    "split": SMALL_TILES,
    "plain": dataclasses.replace(SMALL_TILES, split_masks=False, prefetch_pages=False),
    "splits4": dataclasses.replace(SMALL_TILES, target_programs=64, small_batch_programs=0),
}


@pytest.mark.parametrize("window", [None, 19])
@pytest.mark.parametrize("name", list(SMALL_TILE_SIZES))
def test_interpret_small_tiles(name: str, window: int | None) -> None:
    spec = mixed_spec(
        8, 4, 2, 64, "float32", pages_per_seq=6, seed=10, sliding_window=window,
        num_padding_rows=37,
    )  # fmt: skip
    _check(spec, interpret=True, block_sizes=SMALL_TILE_SIZES[name])


def test_interpret_batch_invariant_tiles() -> None:
    # one tile for decode and chunk rows, no split, no small-batch knobs (batch_invariant=True)
    spec = mixed_spec(8, 8, 2, 64, "float32", pages_per_seq=6, seed=11, sliding_window=13)
    _check(spec, interpret=True, block_sizes=gpu.INVARIANT_BLOCK_SIZES)


def test_rejects_non_power_of_two_page_size() -> None:
    case = make_case(decode_spec(12, 4, 2, 64, "float32"))
    with pytest.raises(ValueError, match="page_size"):
        gpu.ragged_paged_attention(*case.args(), **case.kwargs(), interpret=True)


needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "spec", sweep_specs(page_sizes=(8, 16, 32), cross_dtypes=False), ids=spec_id
)
def test_gpu_sweep(spec: CaseSpec) -> None:
    _check(spec)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sizes", DECODE_ONLY_SPLITS, ids=("one_split", "splits"))
def test_gpu_decode_only(sizes: gpu.GpuBlockSizes) -> None:
    for ps, hq, hkv, d in ((16, 32, 8, 128), (8, 8, 8, 64)):
        spec = decode_spec(ps, hq, hkv, d, "bfloat16", num_seqs=20, pages_per_seq=12,
                           num_padding_seqs=4, num_padding_rows=4, seed=ps)  # fmt: skip
        _check(spec, block_sizes=sizes, decode_only=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("spec", INTERPRET_SPECS, ids=spec_id)
def test_gpu_options(spec: CaseSpec) -> None:
    _check(spec)


@pytest.mark.gpu
@pytest.mark.slow  # the longest kernel case: a 4096-token decode context
@needs_gpu
@pytest.mark.parametrize("num_seqs,pages_per_seq", [(2, 256), (40, 24)])
def test_gpu_long_and_wide(num_seqs: int, pages_per_seq: int) -> None:
    _check(decode_spec(16, 32, 8, 128, "bfloat16", num_seqs=num_seqs, pages_per_seq=pages_per_seq))
    # mixed batches at up to 1024 tokens: the float64 oracle of a 4096-token chunk took a minute
    _check(mixed_spec(16, 32, 8, 128, "bfloat16", pages_per_seq=min(pages_per_seq, 64), seed=1))


# The tile variants bench_kernel.py times (docs/kernels.md), on the real compiler.
GPU_VARIANTS = [
    gpu.GpuBlockSizes(decode_stages=3, prefill_stages=3),
    gpu.GpuBlockSizes(decode_kv_tokens=64, prefill_rows=128, prefill_warps=8, prefill_stages=3),
    gpu.GpuBlockSizes(prefill_kv_tokens=128, prefill_rows=128, prefill_warps=4),
    gpu.GpuBlockSizes(split_masks=False, prefetch_pages=False),
    gpu.INVARIANT_BLOCK_SIZES,  # the engine's batch_invariant mode
]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sizes", GPU_VARIANTS, ids=range(len(GPU_VARIANTS)))
def test_gpu_variants(sizes: gpu.GpuBlockSizes) -> None:
    spec = mixed_spec(16, 32, 8, 128, "bfloat16", pages_per_seq=24, sliding_window=40)
    _check(spec, block_sizes=sizes)
    _check(
        decode_spec(16, 32, 8, 128, "bfloat16", num_seqs=40, pages_per_seq=24), block_sizes=sizes
    )


@pytest.mark.parametrize(
    "spec",
    [
        mixed_spec(16, 32, 8, 128, "bfloat16", sliding_window=9, soft_cap=20.0),
        decode_spec(8, 9, 3, 64, "float32"),
        mixed_spec(32, 16, 1, 64, "bfloat16", pages_per_seq=3),
    ],
    ids=spec_id,
)
def test_triton_lowering_on_cpu(spec: CaseSpec) -> None:
    # Runs the Pallas -> Triton IR lowering without a GPU (not Triton's own compiler).
    case = make_case(spec)
    fn = jax.jit(lambda *a: gpu.ragged_paged_attention(*a, **case.kwargs()))
    text = fn.trace(*case.args()).lower(lowering_platforms=("cuda",)).as_text()
    assert "rpa_decode" in text and "rpa_prefill" in text
