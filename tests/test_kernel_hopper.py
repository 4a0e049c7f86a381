"""The Hopper prefill kernel (Mosaic GPU) and its tile table, on the CPU.

The kernel runs in Mosaic GPU's interpreter, which simulates the three warpgroups as threads,
the TMA copies and the barriers (a barrier phase nobody waits for is an error there), so the
pipeline's bookkeeping, the page-table reads, the V zeroing past each length and the
row-exact stores are checked here; the tensor-core matmuls are plain dots in the interpreter
and are checked on the GPU (tests/test_kernel_gpu.py, `-m gpu`).
"""

from __future__ import annotations

import faulthandler

import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import params as mgpu_interpret
from kernel_cases import CaseSpec, assert_close, make_case, oracle

from paged_jax.kernels import gpu_hopper, gpu_tiles

TILE = gpu_hopper.TILE


def _expected_tiles(cu_q_lens, num_seqs: int, num_tokens: int, kv_lens) -> list[tuple]:
    """(seq, base, lo, hi, pos_off, kv_len) per tile, chunk tiles first, then zero tiles."""
    tiles = []
    for s in range(num_seqs):
        start, end = int(cu_q_lens[s]), int(cu_q_lens[s + 1])
        if end - start < 2:
            continue
        base = start - start % 8
        while base < end:
            tiles.append(
                (s, base, max(base, start), min(base + TILE, end), kv_lens[s] - end, kv_lens[s])
            )
            base += TILE
    pad = int(cu_q_lens[num_seqs])
    base = pad - pad % 8
    while base < num_tokens:
        tiles.append((0, base, max(base, pad), min(base + TILE, num_tokens), 0, 0))
        base += TILE
    return tiles


@pytest.mark.parametrize("seed", range(6))
def test_tile_table(seed: int) -> None:
    rng = np.random.default_rng(seed)
    max_num_seqs = int(rng.integers(1, 40))
    num_seqs = int(rng.integers(0, max_num_seqs + 1))
    q_lens = rng.choice([0, 1, 1, 2, 7, 9, 64, 130, 300], num_seqs)
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1 : num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1 :] = cu[num_seqs]
    num_tokens = int(cu[-1]) + int(rng.integers(0, 200))
    if num_tokens == 0:
        num_tokens = 8
    kv_lens = (cu[1:] - cu[:-1]) + rng.integers(0, 500, max_num_seqs).astype(np.int32)
    table, count = gpu_tiles.tile_table(
        cu,
        kv_lens,
        np.array([num_seqs], np.int32),
        num_tokens=num_tokens,
        tile=TILE,
        interpret=True,
    )
    table, count = np.asarray(table), int(np.asarray(count)[0])
    expected = _expected_tiles(cu, num_seqs, num_tokens, kv_lens)
    assert count == len(expected) <= table.shape[0]
    assert [tuple(int(x) for x in row[:6]) for row in table[:count]] == expected


INTERPRET_SPECS = [
    # GQA 2:1, page 16: chunks crossing 8-aligned and 128-row tile edges, a decode row, a
    # chunk of 2, a long tail in the last page (NaN after it), padding rows.
    CaseSpec(
        16,
        2,
        1,
        64,
        "bfloat16",
        kv_lens=(150, 40, 1, 180, 33),
        q_lens=(130, 40, 1, 7, 33),
        pages_per_seq=12,
        num_padding_rows=5,
    ),  # fmt: skip
    # page 8 and head_dim 128; one sequence whose chunk is its whole prompt.
    CaseSpec(8, 2, 2, 128, "bfloat16", kv_lens=(70, 19), q_lens=(2, 19), pages_per_seq=9, seed=3),
]


@pytest.mark.parametrize("spec", INTERPRET_SPECS, ids=["gqa2-ps16", "ps8-d128"])
def test_interpret_prefill(spec: CaseSpec) -> None:
    case = make_case(spec)
    q, k_pages, v_pages, kv_lens, tables, cu, num_seqs = case.args()
    # An exception inside the interpreter leaves its threads waiting forever: past this
    # limit, dump every thread's stack and exit, so CI fails instead of hanging.
    faulthandler.dump_traceback_later(600, exit=True)
    try:
        out = np.asarray(_interpret(case, q, k_pages, v_pages, tables, cu, kv_lens, num_seqs))
    finally:
        faulthandler.cancel_dump_traceback_later()
    out = out.astype(np.float32)
    assert out.shape == case.q.shape
    expected = oracle(case)
    chunk_rows = [
        r
        for s in range(int(case.num_seqs[0]))
        if case.cu_q_lens[s + 1] - case.cu_q_lens[s] > 1
        for r in range(case.cu_q_lens[s], case.cu_q_lens[s + 1])
    ]
    assert_close(out[chunk_rows], expected[chunk_rows], spec.dtype)
    assert (out[int(case.cu_q_lens[-1]) :] == 0).all()  # padding rows


def _interpret(case, q, k_pages, v_pages, tables, cu, kv_lens, num_seqs):
    return gpu_hopper.prefill(
        q, k_pages, v_pages, tables, cu, kv_lens, num_seqs, sm_scale=case.sm_scale,
        sizes=gpu_hopper.HopperBlockSizes(block_kv=64),
        interpret=mgpu_interpret.InterpretGPUParams(),
    )  # fmt: skip
