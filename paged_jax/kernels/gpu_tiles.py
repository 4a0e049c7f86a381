"""The Hopper prefill kernel's tile table, built on the GPU by one small Triton launch.

Each row of the table is a tile of up to `TILE` consecutive q rows of one chunk (a sequence
with q_len > 1) starting at an 8-aligned row: (seq, first row of the tile, first and end row it
owns, position of row t minus t, kv_len). Chunk tiles come first, then zero tiles over
the padding rows past cu_q_lens[num_seqs] (kv_len 0: nothing to attend, zeros written);
`count` says how many rows are real. Built with jnp ops it took several XLA launches per call;
this is one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

FIELDS = 6  # seq, tile base row, first owned row, end owned row, position offset, kv_len
_ITEMS_PER_PROGRAM = 16


def num_items(num_tokens: int, max_num_seqs: int, tile: int) -> int:
    """Rows of the table: a bound on chunk tiles plus zero tiles for any ragged split."""
    # A chunk of L tokens starting `lead` (< 8) rows past an 8-aligned row spans
    # ceil((lead + L) / tile) <= L / tile + 2 tiles; the padding rows are one more such span.
    return -(-num_tokens // tile) + 2 * min(max_num_seqs, num_tokens // 2) + 2


def _kernel(cu_q_lens_ref, kv_lens_ref, num_seqs_ref, table_ref, count_ref, *, tile: int,
            num_tokens: int):  # fmt: skip
    max_num_seqs = cu_q_lens_ref.shape[0] - 1
    num_items = table_ref.shape[0]
    s_pad = 1 << max(0, (max_num_seqs - 1).bit_length())
    i = jax.lax.broadcasted_iota(jnp.int32, (s_pad,), 0)  # i32[S']
    ok = i < max_num_seqs
    starts = plgpu.load(cu_q_lens_ref.at[jnp.minimum(i, max_num_seqs)], mask=ok, other=0)
    ends = plgpu.load(cu_q_lens_ref.at[jnp.minimum(i + 1, max_num_seqs)], mask=ok, other=0)
    num_seqs = num_seqs_ref[0]
    chunk = ok & (i < num_seqs) & (ends - starts > 1)
    tiles = jnp.where(chunk, ((starts & 7) + ends - starts + tile - 1) // tile, 0)  # i32[S']
    cum = jnp.cumsum(tiles)  # i32[S'] inclusive
    total = jnp.sum(tiles)
    pad_start = cu_q_lens_ref[jnp.minimum(num_seqs, max_num_seqs)]
    pad_lead = pad_start & 7
    zero_tiles = jnp.where(
        pad_start < num_tokens, (pad_lead + num_tokens - pad_start + tile - 1) // tile, 0
    )

    it = pl.program_id(0) * _ITEMS_PER_PROGRAM + jax.lax.broadcasted_iota(
        jnp.int32, (_ITEMS_PER_PROGRAM,), 0
    )  # i32[I]: this program's table rows
    before = cum[None, :] <= it[:, None]  # bool[I, S']: sequences wholly before the row
    seq = jnp.minimum(jnp.sum(before.astype(jnp.int32), axis=1), max_num_seqs - 1)
    first_tile = jnp.sum(jnp.where(before, tiles[None, :], 0), axis=1)  # tiles before seq
    start = plgpu.load(cu_q_lens_ref.at[seq])
    end = plgpu.load(cu_q_lens_ref.at[seq + 1])
    kv_len = plgpu.load(kv_lens_ref.at[seq])
    base = start - (start & 7) + (it - first_tile) * tile
    zero_base = pad_start - pad_lead + (it - total) * tile
    is_chunk = it < total
    fields = (
        jnp.where(is_chunk, seq, 0),
        jnp.where(is_chunk, base, zero_base),
        jnp.where(is_chunk, jnp.maximum(base, start), jnp.maximum(zero_base, pad_start)),
        jnp.where(
            is_chunk, jnp.minimum(base + tile, end), jnp.minimum(zero_base + tile, num_tokens)
        ),
        jnp.where(is_chunk, kv_len - end, 0),  # position of row t is t + this
        jnp.where(is_chunk, kv_len, 0),
    )
    row_ok = it < num_items
    rows = jnp.minimum(it, num_items - 1)
    for f, value in enumerate(fields):
        plgpu.store(table_ref.at[rows, jnp.full_like(it, f)], value, mask=row_ok)

    @pl.when(pl.program_id(0) == 0)
    def _():
        count_ref[0] = total + zero_tiles


@functools.partial(jax.jit, static_argnames=("num_tokens", "tile", "interpret"))
def tile_table(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, *, num_tokens: int,
    tile: int, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(i32[items, 6] tiles, i32[1] how many are real) for `num_tokens` packed q rows."""
    items = num_items(num_tokens, cu_q_lens.shape[0] - 1, tile)
    return pl.pallas_call(
        functools.partial(_kernel, tile=tile, num_tokens=num_tokens),
        grid=(pl.cdiv(items, _ITEMS_PER_PROGRAM),),
        out_shape=(
            jax.ShapeDtypeStruct((items, FIELDS), jnp.int32),
            jax.ShapeDtypeStruct((1,), jnp.int32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rpa_tiles",
    )(cu_q_lens, kv_lens, num_seqs)
