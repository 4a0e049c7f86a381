"""Pallas GPU (Triton lowering) ragged paged attention: a decode grid and a prefill grid.

Two launches share one kernel body, each specialised by static tile sizes:

- decode grid (S, Hkv, num_splits): one program per (sequence with q_len 1, kv head, kv split).
  All q heads of the kv head's group form the rows of one matmul (padded to 16 for the tensor
  cores). The context is split over `num_splits` programs so that short batches still fill the
  GPU; partial (acc, max, sum) are merged by a small XLA combine. Metadata is read in-kernel
  (no preparatory XLA ops), so a decode step costs one kernel plus one small fusion.
- prefill grid (num_tiles, Hkv): one program per tile of `block_q` q rows of one sequence with
  q_len > 1 (a chunk), rows x group heads as matmul rows, causal mask on absolute positions.
  The tile -> (sequence, tile index) table is built by a few tiny jnp ops.

K/V are read straight from the page arrays through the page table (pointer gathers, one page
id per kv token); loads are masked past each sequence's length, so freed pages (garbage, NaN)
are never read. Each loop step covers `pages_per_block` pages. Online softmax is in f32; P is
cast to the K/V dtype for the PV matmul. Rows past cu_q_lens[num_seqs] come back as 0.

Why Triton lowering and not Mosaic GPU: the Triton lowering runs under `interpret=True` on CPU
on jax 0.10.2 and 0.11.2 alike (our CI has no GPU), its pointer gathers express page-table
reads directly, and Triton pipelines the loop's loads (`num_stages`). See docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from paged_jax.kernels.common import AttentionShape, check_attention_args

_MASKED = -1e30  # running-max floor: finite, so exp(m_old - m_new) never sees inf - inf
_LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Tile sizes and launch knobs of the GPU kernel."""

    # Defaults picked on an H100 (docs/kernels.md): decode is bandwidth-bound, prefill MMA-bound.
    decode_kv_tokens: int = 128  # kv tokens per loop step (whole pages; power of two)
    decode_warps: int = 4
    decode_stages: int = 2
    target_programs: int = 1024  # decode: split the context until the grid has this many
    max_splits: int = 16
    # Few (sequence, kv head) pairs: fewer, fatter splits with more loads in flight.
    small_batch_programs: int = 128  # S * Hkv at or below this uses the three knobs below
    small_batch_warps: int = 8
    small_batch_stages: int = 3
    small_batch_target: int = 512
    prefill_kv_tokens: int = 64
    prefill_rows: int = 64  # matmul rows (q tokens x group heads) of a prefill tile
    prefill_warps: int = 4
    prefill_stages: int = 2


DEFAULT_BLOCK_SIZES = GpuBlockSizes()


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Tile:
    """Static shape of one program's work, derived from the call's shapes."""

    decode: bool
    rows: int  # M: matmul rows = q tokens x padded group heads (>= 16, power of two)
    group: int  # G: q heads per kv head
    group_pad: int  # power of two >= G
    tokens: int  # q tokens per tile (decode: only the first is live)
    pages_per_block: int
    page_size: int
    num_splits: int
    sm_scale: float
    sliding_window: int | None
    soft_cap: float | None


def _kernel(
    kv_lens_ref,  # i32[S]
    cu_q_lens_ref,  # i32[S+1]
    num_seqs_ref,  # i32[1]
    page_tables_ref,  # i32[S, pages_per_seq]
    tile_seq_ref,  # i32[num_tiles] (prefill) / i32[1] unused (decode)
    tile_idx_ref,  # i32[num_tiles] (prefill) / i32[1] unused (decode)
    q_ref,  # [T, Hq, D]
    k_pages_ref,  # [Hkv, P, page_size, D]
    v_pages_ref,  # [Hkv, P, page_size, D]
    *out_refs,  # decode: o f32[splits, S, Hq+1, D], m/l f32[splits, S, Hq+1]; prefill: [T+1, Hq, D]
    t: _Tile,
):
    item, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_tokens, _, head_dim = q_ref.shape
    max_num_seqs, pages_per_seq = page_tables_ref.shape
    block_kv = t.pages_per_block * t.page_size

    if t.decode:
        seq = item
        tile = 0
    else:
        seq = tile_seq_ref[item]  # -1 for unused tiles
        tile = tile_idx_ref[item]
    seq_c = jnp.clip(seq, 0, max_num_seqs - 1)
    q_start = cu_q_lens_ref[seq_c]
    q_len = cu_q_lens_ref[seq_c + 1] - q_start
    kv_len = kv_lens_ref[seq_c]
    live = (seq >= 0) & (seq < num_seqs_ref[0])
    if t.decode:
        live &= q_len == 1
        num_rows = jnp.where(live, q_len, 0)  # q_len == 1 when live
    else:
        num_rows = jnp.where(live, jnp.minimum(t.tokens, q_len - tile * t.tokens), 0)
    first_pos = kv_len - q_len + tile * t.tokens  # absolute position of the tile's first row

    r = lax.broadcasted_iota(jnp.int32, (t.rows,), 0)
    tok, g = r // t.group_pad, r % t.group_pad  # i32[M] each
    row_ok = (tok < num_rows) & (g < t.group)  # bool[M]
    tok_idx = jnp.clip(q_start + tile * t.tokens + tok, 0, num_tokens - 1)  # i32[M]
    head_idx = h * t.group + jnp.minimum(g, t.group - 1)  # i32[M]
    lanes = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)  # i32[1, D]
    # Gathers index every dim with an int array (the CPU interpreter needs that form).
    row_mask = jnp.broadcast_to(row_ok[:, None], (t.rows, head_dim))
    q = plgpu.load(
        q_ref.at[tok_idx[:, None], head_idx[:, None], lanes], mask=row_mask, other=0
    )  # [M, D]
    pos = first_pos + tok  # i32[M]

    kv_hi = jnp.where(num_rows > 0, first_pos + num_rows, 0)  # kv tokens the tile needs
    if t.sliding_window is None:
        kv_lo = 0
    else:
        kv_lo = jnp.maximum(first_pos - t.sliding_window + 1, 0)
    page_lo = kv_lo // t.page_size
    page_hi = (kv_hi + t.page_size - 1) // t.page_size
    num_blocks = jnp.maximum(page_hi - page_lo + t.pages_per_block - 1, 0) // t.pages_per_block
    blocks_per_split = (num_blocks + t.num_splits - 1) // t.num_splits
    block_lo = split * blocks_per_split
    block_hi = jnp.minimum(num_blocks, block_lo + blocks_per_split)

    # f32 inputs: full-precision dots (the default would be tf32).
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    def body(j, carry):
        m, l, acc = carry  # f32[M], f32[M], f32[M, D]
        first_token = (page_lo + j * t.pages_per_block) * t.page_size
        kv_pos = first_token + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)  # i32[BK]
        slot_ok = kv_pos < jnp.minimum(kv_hi, kv_len)  # bool[BK]
        page_col = jnp.minimum(kv_pos // t.page_size, pages_per_seq - 1)
        page_ids = plgpu.load(page_tables_ref.at[seq_c, page_col], mask=slot_ok, other=0)
        offsets = kv_pos % t.page_size  # i32[BK]
        kv_mask = jnp.broadcast_to(slot_ok[:, None], (block_kv, head_dim))
        kv_idx = (h, page_ids[:, None], offsets[:, None], lanes)
        k = plgpu.load(k_pages_ref.at[kv_idx], mask=kv_mask, other=0)  # [BK, D]
        v = plgpu.load(v_pages_ref.at[kv_idx], mask=kv_mask, other=0)  # [BK, D]
        s = lax.dot_general(
            q,
            k,
            (((1,), (1,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )  # f32[M, BK]; log2 domain below (exp2 is the native instruction)
        if t.soft_cap is None:
            s = s * (t.sm_scale * _LOG2E)
        else:
            s = (t.soft_cap * _LOG2E) * jnp.tanh(s * (t.sm_scale / t.soft_cap))
        mask = slot_ok[None, :] & (kv_pos[None, :] <= pos[:, None])  # bool[M, BK]
        if t.sliding_window is not None:
            mask &= kv_pos[None, :] > pos[:, None] - t.sliding_window
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])  # exactly 0 where masked
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )  # f32[M, D]
        return m_new, l, acc * alpha[:, None] + pv

    m0 = jnp.full((t.rows,), _MASKED, jnp.float32)
    l0 = jnp.zeros((t.rows,), jnp.float32)
    acc0 = jnp.zeros((t.rows, head_dim), jnp.float32)
    m, l, acc = lax.fori_loop(block_lo, block_hi, body, (m0, l0, acc0))

    # Masked-off rows point at a spare trailing row of the output: a GPU masked store skips
    # them, and the interpreter (which writes them back unchanged) sees no duplicate index.
    if t.decode:
        o_ref, m_ref, l_ref = out_refs
        spare = o_ref.shape[2] - 1
        head_st = jnp.where(row_ok, head_idx, spare)  # i32[M]
        # Every live sequence's program writes (empty splits too: m = floor, l = 0).
        plgpu.store(o_ref.at[split, seq_c, head_st[:, None], lanes], acc, mask=row_mask)
        plgpu.store(m_ref.at[split, seq_c, head_st], m, mask=row_ok)
        plgpu.store(l_ref.at[split, seq_c, head_st], l, mask=row_ok)
    else:
        (o_ref,) = out_refs
        out = acc / jnp.maximum(l, 1e-30)[:, None]
        tok_st = jnp.where(row_ok, tok_idx, o_ref.shape[0] - 1)  # i32[M]
        o_idx = (tok_st[:, None], head_idx[:, None], lanes)
        plgpu.store(o_ref.at[o_idx], out.astype(o_ref.dtype), mask=row_mask)


def _num_splits(shape: AttentionShape, pages_per_block: int, target: int, max_splits: int) -> int:
    blocks = -(-shape.pages_per_seq // pages_per_block)
    programs = shape.max_num_seqs * shape.num_kv_heads
    splits = 1
    while splits < max_splits and programs * splits < target:
        splits *= 2
    return max(1, min(splits, blocks))


def _prefill_tiles(
    cu_q_lens: jax.Array, num_seqs: jax.Array, tokens: int, num_tiles: int
) -> tuple[jax.Array, jax.Array]:
    """Tile table of the prefill grid: sequence (-1 if unused) and tile index per program."""
    # cu_q_lens: i32[S+1]; num_seqs: i32[1]
    max_num_seqs = cu_q_lens.shape[0] - 1
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # i32[S]
    chunk = (jnp.arange(max_num_seqs) < num_seqs[0]) & (q_lens > 1)
    tiles = jnp.where(chunk, (q_lens + tokens - 1) // tokens, 0)  # i32[S]
    ends = jnp.cumsum(tiles)  # i32[S]
    items = jnp.arange(num_tiles, dtype=jnp.int32)  # i32[num_tiles]
    seq = jnp.sum(items[:, None] >= ends[None, :], axis=1, dtype=jnp.int32)
    seq_c = jnp.minimum(seq, max_num_seqs - 1)
    tile = items - (ends[seq_c] - tiles[seq_c])
    return jnp.where(items < ends[-1], seq_c, -1), tile


def _rows_to_seqs(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int):
    """Per q row: its sequence, whether it is a decode row (q_len 1), whether it is live."""
    max_num_seqs = cu_q_lens.shape[0] - 1
    rows = jnp.arange(num_tokens, dtype=jnp.int32)  # i32[T]
    live_seq = jnp.arange(max_num_seqs) < num_seqs[0]
    seq = jnp.sum((rows[:, None] >= cu_q_lens[None, 1:]) & live_seq, axis=1, dtype=jnp.int32)
    seq = jnp.minimum(seq, max_num_seqs - 1)  # i32[T]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    return seq, q_len == 1, rows < cu_q_lens[num_seqs[0]]


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_sizes", "interpret"),
)
def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_sizes: GpuBlockSizes = DEFAULT_BLOCK_SIZES,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention on GPU (contract: DESIGN.md §4); returns q.dtype [T, Hq, D]."""
    # q: [T, Hq, D]; k_pages/v_pages: [Hkv, P, page_size, D]; kv_lens: i32[S]
    # page_tables: i32[S, max_pages_per_seq]; cu_q_lens: i32[S+1]; num_seqs: i32[1]
    shape = check_attention_args(
        q, k_pages, v_pages, kv_lens, page_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    ps, head_dim = shape.page_size, shape.head_dim
    if ps & (ps - 1):
        raise ValueError(f"{ps=} must be a power of two (page_size) for the GPU kernel")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"{head_dim=} must be a power of two >= 16 for the GPU kernel")
    sizes = block_sizes
    group = shape.group
    group_pad = _pow2_ceil(group)
    common = dict(
        group=group, group_pad=group_pad, page_size=ps,
        sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    small = shape.max_num_seqs * shape.num_kv_heads <= sizes.small_batch_programs
    dec_warps = sizes.small_batch_warps if small else sizes.decode_warps
    dec_stages = sizes.small_batch_stages if small else sizes.decode_stages
    dec_target = sizes.small_batch_target if small else sizes.target_programs
    dec_ppb = max(1, sizes.decode_kv_tokens // ps)
    dec_rows = max(16, group_pad)
    dec = _Tile(
        decode=True, rows=dec_rows, tokens=dec_rows // group_pad, pages_per_block=dec_ppb,
        num_splits=_num_splits(shape, dec_ppb, dec_target, sizes.max_splits), **common,
    )  # fmt: skip
    pre_rows = max(16, group_pad, _pow2_ceil(sizes.prefill_rows))
    pre_tokens = pre_rows // group_pad
    pre = _Tile(
        decode=False, rows=pre_rows, tokens=pre_tokens, num_splits=1,
        pages_per_block=max(1, sizes.prefill_kv_tokens // ps), **common,
    )  # fmt: skip
    num_tokens, num_q_heads, hkv, s_max = (
        shape.num_tokens, shape.num_q_heads, shape.num_kv_heads, shape.max_num_seqs,
    )  # fmt: skip
    unused = jnp.zeros((1,), jnp.int32)
    meta = (kv_lens, cu_q_lens, num_seqs, page_tables)

    def call(tile: _Tile, grid, out_shape, tables, warps, stages):
        return pl.pallas_call(
            functools.partial(_kernel, t=tile),
            grid=grid,
            out_shape=out_shape,
            compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
            interpret=interpret,
            name="rpa_decode" if tile.decode else "rpa_prefill",
        )(*meta, *tables, q, k_pages, v_pages)

    o_dec, m_dec, l_dec = call(
        dec,
        (s_max, hkv, dec.num_splits),
        (
            jax.ShapeDtypeStruct((dec.num_splits, s_max, num_q_heads + 1, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((dec.num_splits, s_max, num_q_heads + 1), jnp.float32),
            jax.ShapeDtypeStruct((dec.num_splits, s_max, num_q_heads + 1), jnp.float32),
        ),
        (unused, unused),
        dec_warps,
        dec_stages,
    )
    seq, is_decode, live = _rows_to_seqs(cu_q_lens, num_seqs, num_tokens)  # [T] each
    o_dec, m_dec, l_dec = o_dec[:, :, :num_q_heads], m_dec[:, :, :num_q_heads], l_dec[..., :-1]
    # Merge the decode splits: f32[S, Hq, D].
    m_max = jnp.max(m_dec, axis=0)  # f32[S, Hq]; log2 domain
    w = jnp.exp2(m_dec - m_max)  # f32[splits, S, Hq]
    l_tot = jnp.sum(l_dec * w, axis=0)
    o_seq = jnp.sum(o_dec * w[..., None], axis=0) / jnp.maximum(l_tot, 1e-30)[..., None]
    out = o_seq[seq]  # f32[T, Hq, D]

    if num_tokens > 1:  # a prefill chunk needs at least two rows
        num_tiles = -(-num_tokens // pre_tokens) + min(s_max, num_tokens // 2)
        tile_seq, tile_idx = _prefill_tiles(cu_q_lens, num_seqs, pre_tokens, num_tiles)
        o_pre = call(
            pre,
            (num_tiles, hkv, 1),
            jax.ShapeDtypeStruct((num_tokens + 1, num_q_heads, head_dim), q.dtype),
            (tile_seq, tile_idx),
            sizes.prefill_warps,
            sizes.prefill_stages,
        )[:num_tokens]  # [T, Hq, D]; rows it does not own are unwritten
        out = jnp.where(is_decode[:, None, None], out, o_pre.astype(jnp.float32))
    return jnp.where(live[:, None, None], out, 0.0).astype(q.dtype)
