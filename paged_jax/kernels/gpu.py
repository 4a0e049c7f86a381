"""Pallas GPU ragged paged attention: a Triton decode grid, and a Triton or Hopper prefill.

Two Triton launches share one kernel body, each specialised by static tile sizes:

- decode grid (S, Hkv, num_splits): one program per (sequence with q_len 1, kv head, kv split).
  All q heads of the kv head's group form the rows of one matmul (padded to 16 for the tensor
  cores). With one split the program writes its normalised rows straight into the output; with
  more, partial (acc, max, sum) go to a small XLA merge that also places the rows.
- prefill grid (num_tiles, Hkv): one program per tile of `tokens` q rows of one sequence with
  q_len > 1 (a chunk), rows x group heads as matmul rows. Each program finds its tile from
  cu_q_lens in-kernel (a cumsum over sequences); programs past the last chunk tile write zeros
  over the padding rows. It updates the decode grid's output in place (aliased), so a
  decode-only step is two launches and no XLA ops.

On a Hopper GPU, calls with more q rows than sequences (T > S: room for chunks) run the chunk
rows through the Mosaic GPU kernel of gpu_hopper.py instead (TMA + wgmma, warp-specialised),
then the decode grid writes its rows into that output. Decode buckets (T <= S) keep the two
Triton launches above, which cost less when there is nothing to prefill.

K/V are read straight from the page arrays: per loop step the `pages_per_block` page ids are
scalar loads and every kv row's address is `(page * page_size + offset) * D + lane`. Loop steps
are split three ways: blocks every row of the tile sees in full run without any mask (no load
masks, no -inf select); only the blocks on the causal diagonal, at the context's tail or at a
sliding window's edge are masked. Masked loads never touch memory past a sequence's length, so
freed pages (garbage, NaN) are never read. Online softmax is in f32 in the log2 domain; P is cast
to the K/V dtype for the PV matmul. Rows past cu_q_lens[num_seqs] come back as 0.

Decode stays on Triton: its pointer gathers express page-table reads directly, Triton
pipelines the loop's loads (`num_stages`), and it is at cuDNN's speed (docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from paged_jax.kernels import gpu_hopper
from paged_jax.kernels.common import LOG2E, MASKED, AttentionShape, check_attention_args

_SHARED_BUDGET = 200 * 1024  # bytes per program: under the 227 KiB of an H100/H200
_MAX_SCALAR_PAGES = 16  # more pages per loop step than this: one vector load of page ids


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Tile sizes and launch knobs of the GPU kernel."""

    # Defaults picked on an H100 (docs/kernels.md): decode is bandwidth-bound, prefill MMA-bound.
    decode_kv_tokens: int = 128  # kv tokens per loop step (whole pages; power of two)
    decode_warps: int = 4
    decode_stages: int = 2
    # Decode: split the context until the grid has this many programs. 256 = no split once
    # S * Hkv >= 256: one pass per (sequence, kv head) and no merge beat 4 splits (H100).
    target_programs: int = 256
    max_splits: int = 16
    # Few (sequence, kv head) pairs: fewer, fatter splits with more loads in flight.
    small_batch_programs: int = 128  # S * Hkv at or below this uses the four knobs below
    small_batch_kv_tokens: int = 64
    small_batch_warps: int = 8
    small_batch_stages: int = 3
    small_batch_target: int = 512
    prefill_kv_tokens: int = 64
    prefill_rows: int = 64  # matmul rows (q tokens x group heads) of a prefill tile
    prefill_warps: int = 4
    prefill_stages: int = 3
    split_masks: bool = True  # unmasked loop over fully visible blocks, masked loop for the rest
    prefetch_pages: bool = True  # load the next block's page ids one loop step ahead
    # Prefill on Hopper: the Mosaic GPU kernel of gpu_hopper.py where it applies.
    hopper_prefill: bool = True
    hopper_kv_tokens: int = 128
    hopper_stages: int = 2


DEFAULT_BLOCK_SIZES = GpuBlockSizes()
# Batch-invariant mode: the same tile (rows, kv block, warps, stages, one masked loop) for
# decode rows and chunk rows, no small-batch knobs, no kv split (its count follows the batch)
# and no Hopper prefill kernel, so a row's reduction order depends on its own position only.
INVARIANT_BLOCK_SIZES = GpuBlockSizes(
    decode_kv_tokens=64, decode_warps=4, decode_stages=2, target_programs=0, max_splits=1,
    small_batch_programs=-1, prefill_kv_tokens=64, prefill_rows=16, prefill_warps=4,
    prefill_stages=2, split_masks=False, hopper_prefill=False,
)  # fmt: skip


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


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
    num_pages: int  # P
    num_q_heads: int  # Hq
    num_splits: int
    sm_scale: float
    sliding_window: int | None
    soft_cap: float | None
    split_masks: bool
    prefetch_pages: bool
    spare: bool  # interpret mode: masked rows store into spare rows past T * Hq
    zero_dead: bool = False  # decode-only call: programs of padding sequences zero their row

    @property
    def block_kv(self) -> int:
        return self.pages_per_block * self.page_size


def _tile_of_program(t: _Tile, item, cu_q_lens_ref, num_seqs_ref, num_tokens: int):
    """Prefill: (sequence, tile index, used) of program `item`; zero tiles follow used ones."""
    max_num_seqs = cu_q_lens_ref.shape[0] - 1
    i = lax.broadcasted_iota(jnp.int32, (_pow2_ceil(max_num_seqs),), 0)  # i32[S']
    ok = i < max_num_seqs
    starts = plgpu.load(cu_q_lens_ref.at[jnp.minimum(i, max_num_seqs)], mask=ok, other=0)
    ends = plgpu.load(cu_q_lens_ref.at[jnp.minimum(i + 1, max_num_seqs)], mask=ok, other=0)
    q_lens = ends - starts  # i32[S']
    chunk = ok & (i < num_seqs_ref[0]) & (q_lens > 1)
    tiles = jnp.where(chunk, lax.shift_right_logical(q_lens + t.tokens - 1, _log2(t.tokens)), 0)
    cum = jnp.cumsum(tiles)  # i32[S'] inclusive: tiles of sequences 0..i
    before = cum <= item
    seq = jnp.sum(before.astype(jnp.int32))
    tile = item - jnp.max(jnp.where(before, cum, 0))
    used = item < jnp.sum(tiles)
    # Zero tile u covers padding rows pad_start + u * tokens + [0, tokens).
    pad_start = cu_q_lens_ref[jnp.minimum(num_seqs_ref[0], max_num_seqs)]
    zero_first = pad_start + (item - jnp.sum(tiles)) * t.tokens
    zero_rows = jnp.clip(num_tokens - zero_first, 0, t.tokens)
    return seq, tile, used, zero_first, zero_rows


def _kernel(
    kv_lens_ref,  # i32[S]
    cu_q_lens_ref,  # i32[S+1]
    num_seqs_ref,  # i32[1]
    page_tables_ref,  # i32[S, pages_per_seq]
    q_ref,  # [T * Hq, D]
    k_ref,  # [Hkv * P * page_size, D]: the page array, flattened to kv rows
    v_ref,  # [Hkv * P * page_size, D]
    *out_refs,  # see ragged_paged_attention: decode partials or the [R, D] output
    t: _Tile,
):
    item, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[1]
    num_tokens = q_ref.shape[0] // t.num_q_heads
    max_num_seqs, pages_per_seq = page_tables_ref.shape
    block_kv, ps = t.block_kv, t.page_size

    if t.decode:
        seq, tile = item, 0
    else:
        seq, tile, used, zero_first, zero_rows = _tile_of_program(
            t, item, cu_q_lens_ref, num_seqs_ref, num_tokens
        )
    seq_c = jnp.clip(seq, 0, max_num_seqs - 1)
    q_start = cu_q_lens_ref[seq_c]
    q_len = cu_q_lens_ref[seq_c + 1] - q_start
    kv_len = kv_lens_ref[seq_c]
    if t.decode:
        live = (seq < num_seqs_ref[0]) & (q_len == 1)
        num_rows = jnp.where(live, q_len, 0)  # q_len == 1 when live
        store_first, store_rows = q_start, num_rows
        if t.zero_dead:  # row i is sequence i's; a padding sequence's program zeroes its row
            store_first = jnp.where(live, q_start, seq)
            store_rows = jnp.where(live, num_rows, (seq < num_tokens).astype(jnp.int32))
    else:
        num_rows = jnp.where(used, jnp.minimum(t.tokens, q_len - tile * t.tokens), 0)
        store_first = jnp.where(used, q_start + tile * t.tokens, zero_first)
        store_rows = jnp.where(used, num_rows, zero_rows)
    first_pos = kv_len - q_len + tile * t.tokens  # absolute position of the tile's first row

    r = lax.broadcasted_iota(jnp.int32, (t.rows,), 0)
    tok = lax.shift_right_logical(r, _log2(t.group_pad))  # i32[M]
    g = r & (t.group_pad - 1)  # i32[M]
    head_idx = h * t.group + jnp.minimum(g, t.group - 1)  # i32[M]
    row_ok = (tok < num_rows) & (g < t.group)  # bool[M]
    q_row = jnp.clip(q_start + tile * t.tokens + tok, 0, num_tokens - 1) * t.num_q_heads
    lanes = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)  # i32[1, D]
    # Gathers index every dim with an int array (the CPU interpreter needs that form).
    row_mask = jnp.broadcast_to(row_ok[:, None], (t.rows, head_dim))
    q = plgpu.load(q_ref.at[(q_row + head_idx)[:, None], lanes], mask=row_mask, other=0)  # [M, D]
    pos = first_pos + tok  # i32[M]

    kv_hi = jnp.where(num_rows > 0, first_pos + num_rows, 0)  # kv tokens the tile needs
    kv_lo = 0 if t.sliding_window is None else jnp.maximum(first_pos - t.sliding_window + 1, 0)
    page_lo = lax.shift_right_logical(kv_lo, _log2(ps))
    page_hi = lax.shift_right_logical(kv_hi + ps - 1, _log2(ps))
    num_blocks = jnp.maximum(page_hi - page_lo + t.pages_per_block - 1, 0) // t.pages_per_block
    blocks_per_split = (num_blocks + t.num_splits - 1) // t.num_splits
    block_lo = split * blocks_per_split
    block_hi = jnp.minimum(num_blocks, block_lo + blocks_per_split)

    slot = lax.broadcasted_iota(jnp.int32, (block_kv,), 0)  # i32[BK]
    slot_page = lax.shift_right_logical(slot, _log2(ps))  # i32[BK]: page of each slot in a block
    kv_head_row = h * (t.num_pages * ps)  # first kv row of this head in the flattened pages
    # f32 inputs: full-precision dots (the default would be tf32).
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    scale = t.sm_scale * LOG2E  # logits to the log2 domain (exp2 is the native instruction)

    def page_ids(j):
        """i32[BK]: page id of each slot of block j (columns clipped to the table)."""
        first_page = page_lo + j * t.pages_per_block
        if t.pages_per_block > _MAX_SCALAR_PAGES:
            cols = jnp.minimum(first_page + slot_page, pages_per_seq - 1)
            return plgpu.load(page_tables_ref.at[seq_c, cols])
        ids = None  # scalar loads, then a select per slot
        for i in range(t.pages_per_block):
            pid = page_tables_ref[seq_c, jnp.minimum(first_page + i, pages_per_seq - 1)]
            ids = (
                jnp.broadcast_to(pid, (block_kv,))
                if i == 0
                else jnp.where(slot_page == i, pid, ids)
            )
        return ids

    def body(j, carry, masked):
        m, l, acc, ids = carry  # f32[M], f32[M], f32[M, D], i32[BK] (prefetch) or None
        if t.prefetch_pages:  # this block's ids came from the last step; fetch the next's
            ids, next_ids = ids, page_ids(j + 1)
        else:
            ids, next_ids = page_ids(j), None
        kv_pos = (page_lo + j * t.pages_per_block) * ps + slot  # i32[BK]
        rows = kv_head_row + ids * ps + (slot & (ps - 1))  # i32[BK]: flattened kv rows
        if masked:
            slot_ok = kv_pos < jnp.minimum(kv_hi, kv_len)  # bool[BK]
            rows = jnp.where(slot_ok, rows, 0)
        rows = rows[:, None]  # i32[BK, 1]
        if masked:
            kv_mask = jnp.broadcast_to(slot_ok[:, None], (block_kv, head_dim))
            k = plgpu.load(k_ref.at[rows, lanes], mask=kv_mask, other=0)  # [BK, D]
            v = plgpu.load(v_ref.at[rows, lanes], mask=kv_mask, other=0)  # [BK, D]
        else:
            k = plgpu.load(k_ref.at[rows, lanes])
            v = plgpu.load(v_ref.at[rows, lanes])
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # f32[M, BK]
        if t.soft_cap is not None:
            s = (t.soft_cap * LOG2E) * jnp.tanh(s * (t.sm_scale / t.soft_cap))
        if masked:
            mask = slot_ok[None, :] & (kv_pos[None, :] <= pos[:, None])  # bool[M, BK]
            if t.sliding_window is not None:
                mask &= kv_pos[None, :] > pos[:, None] - t.sliding_window
            s = jnp.where(mask, s, -jnp.inf)
        if t.soft_cap is None:  # scale inside exp2's argument: one fused multiply-add
            m_new = jnp.maximum(m, jnp.max(s, axis=1) * scale)
            p = jnp.exp2(s * scale - m_new[:, None])  # exactly 0 where masked
        else:
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp2(s - m_new[:, None])
        alpha = jnp.exp2(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )  # f32[M, D]
        return m_new, l, acc * alpha[:, None] + pv, next_ids

    def loop(lo, hi, masked, carry):
        ids = page_ids(lo) if t.prefetch_pages else None
        m, l, acc, _ = lax.fori_loop(lo, hi, functools.partial(body, masked=masked), (*carry, ids))
        return m, l, acc

    carry = (
        jnp.full((t.rows,), MASKED, jnp.float32),
        jnp.zeros((t.rows,), jnp.float32),
        jnp.zeros((t.rows, head_dim), jnp.float32),
    )
    if t.split_masks:
        # Blocks [full_lo, full_hi) are seen in full by every row: kv < first_pos + 1 (causal),
        # and kv > last_pos - window (sliding window). The rest go through the masked body.
        base = page_lo * ps
        full_hi = lax.div(jnp.maximum(first_pos + 1 - base, 0), block_kv)
        full_lo = 0
        if t.sliding_window is not None:
            last_pos = first_pos + num_rows - 1
            lo_tok = jnp.maximum(last_pos - t.sliding_window + 1 - base, 0)
            full_lo = lax.div(lo_tok + block_kv - 1, block_kv)
        a = jnp.clip(full_lo, block_lo, block_hi)
        b = jnp.clip(full_hi, a, block_hi)
        if t.sliding_window is not None:
            carry = loop(block_lo, a, True, carry)
        carry = loop(a, b, False, carry)
        carry = loop(b, block_hi, True, carry)
    else:
        carry = loop(block_lo, block_hi, True, carry)
    m, l, acc = carry

    if t.decode and t.num_splits > 1:
        # Masked-off rows point at a spare trailing head: a GPU masked store skips them, and
        # the interpreter (which writes them back unchanged) sees no duplicate index.
        o_ref, m_ref, l_ref = out_refs
        head_st = jnp.where(row_ok, head_idx, o_ref.shape[2] - 1)  # i32[M]
        # Every live sequence's program writes (empty splits too: m = floor, l = 0).
        plgpu.store(o_ref.at[split, seq_c, head_st[:, None], lanes], acc, mask=row_mask)
        plgpu.store(m_ref.at[split, seq_c, head_st], m, mask=row_ok)
        plgpu.store(l_ref.at[split, seq_c, head_st], l, mask=row_ok)
        return
    o_ref = out_refs[-1]  # prefill: out_refs[0] is the aliased input, the same buffer
    out = acc / jnp.maximum(l, 1e-30)[:, None]  # zero tiles: acc = 0, out = 0
    st_ok = (tok < store_rows) & (g < t.group)  # bool[M]
    st_row = jnp.clip(store_first + tok, 0, num_tokens - 1) * t.num_q_heads + head_idx
    if t.spare:
        st_row = jnp.where(st_ok, st_row, num_tokens * t.num_q_heads + r)
    st_mask = jnp.broadcast_to(st_ok[:, None], (t.rows, head_dim))
    plgpu.store(o_ref.at[st_row[:, None], lanes], out.astype(o_ref.dtype), mask=st_mask)


def _fit_shared(
    kv_tokens: int, stages: int, rows: int, head_dim: int, itemsize: int, page_size: int
) -> tuple[int, int]:
    """(kv tokens per loop step, stages) whose K/V buffers and q tile fit in shared memory."""
    kv_tokens = max(1, kv_tokens // page_size) * page_size  # whole pages

    def smem(tokens: int, n: int) -> int:  # Triton keeps up to `stages` K/V buffers
        return (n * 2 * tokens + rows) * head_dim * itemsize

    while kv_tokens > max(page_size, 16) and smem(kv_tokens, stages) > _SHARED_BUDGET:
        kv_tokens //= 2  # f32 with head_dim 128: a 128-token block is 128 KiB of K+V
    while stages > 1 and smem(kv_tokens, stages) > _SHARED_BUDGET:
        stages -= 1
    return kv_tokens, stages


def _num_splits(shape: AttentionShape, pages_per_block: int, target: int, max_splits: int) -> int:
    blocks = -(-shape.pages_per_seq // pages_per_block)
    programs = shape.max_num_seqs * shape.num_kv_heads
    splits = 1
    while splits < max_splits and programs * splits < target:
        splits *= 2
    return max(1, min(splits, blocks))


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "soft_cap", "block_sizes", "interpret", "decode_only",
    ),
)  # fmt: skip
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
    decode_only: bool = False,
) -> jax.Array:
    """Ragged paged attention on GPU (contract: docs/kernels.md); returns q.dtype [T, Hq, D].

    ``decode_only``: the caller promises every live sequence has q_len 1 and T == S (a decode
    step or burst); the chunk launch is skipped and the decode grid zeroes the padding rows."""
    # q: [T, Hq, D]; k_pages/v_pages: [Hkv, P, page_size, D]; kv_lens: i32[S]
    # page_tables: i32[S, max_pages_per_seq]; cu_q_lens: i32[S+1]; num_seqs: i32[1]
    shape = check_attention_args(
        q, k_pages, v_pages, kv_lens, page_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    ps, head_dim = shape.page_size, shape.head_dim
    if decode_only and shape.num_tokens != shape.max_num_seqs:
        raise ValueError(
            f"decode_only needs T == S, got T={shape.num_tokens}, S={shape.max_num_seqs}"
        )
    if ps & (ps - 1):
        raise ValueError(f"{ps=} must be a power of two (page_size) for the GPU kernel")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"{head_dim=} must be a power of two >= 16 for the GPU kernel")
    sizes = block_sizes
    group_pad = _pow2_ceil(shape.group)
    num_tokens, num_q_heads, hkv, s_max = (
        shape.num_tokens, shape.num_q_heads, shape.num_kv_heads, shape.max_num_seqs,
    )  # fmt: skip
    common = dict(
        group=shape.group, group_pad=group_pad, page_size=ps, num_pages=shape.num_pages,
        num_q_heads=num_q_heads, sm_scale=float(sm_scale), sliding_window=sliding_window,
        soft_cap=soft_cap, split_masks=sizes.split_masks,
        prefetch_pages=sizes.prefetch_pages, spare=interpret,
    )  # fmt: skip
    small = s_max * hkv <= sizes.small_batch_programs
    dec_warps = sizes.small_batch_warps if small else sizes.decode_warps
    dec_stages = sizes.small_batch_stages if small else sizes.decode_stages
    dec_target = sizes.small_batch_target if small else sizes.target_programs
    dec_kv_tokens = sizes.small_batch_kv_tokens if small else sizes.decode_kv_tokens
    isz = q.dtype.itemsize
    dec_rows = max(16, group_pad)
    dec_kv, dec_stages = _fit_shared(dec_kv_tokens, dec_stages, dec_rows, head_dim, isz, ps)
    dec_ppb = dec_kv // ps
    dec = _Tile(
        decode=True, rows=dec_rows, tokens=dec_rows // group_pad, pages_per_block=dec_ppb,
        num_splits=_num_splits(shape, dec_ppb, dec_target, sizes.max_splits),
        zero_dead=decode_only, **common,
    )  # fmt: skip
    pre_rows = max(16, group_pad, _pow2_ceil(sizes.prefill_rows))
    pre_kv, pre_stages = _fit_shared(
        sizes.prefill_kv_tokens, sizes.prefill_stages, pre_rows, head_dim, isz, ps
    )
    pre = _Tile(
        decode=False, rows=pre_rows, tokens=pre_rows // group_pad, num_splits=1,
        pages_per_block=pre_kv // ps, **common,
    )  # fmt: skip
    # Output rows: token * Hq + head, plus (interpreter only) spare rows for masked stores.
    num_rows = num_tokens * num_q_heads + (max(dec_rows, pre_rows) if interpret else 0)
    out_shape = jax.ShapeDtypeStruct((num_rows, head_dim), q.dtype)
    meta = (kv_lens, cu_q_lens, num_seqs, page_tables)
    flat = (
        q.reshape(num_tokens * num_q_heads, head_dim),
        k_pages.reshape(-1, head_dim),
        v_pages.reshape(-1, head_dim),
    )

    def finish(out: jax.Array) -> jax.Array:  # [num_rows, D] -> [T, Hq, D]
        return out[: num_tokens * num_q_heads].reshape(num_tokens, num_q_heads, head_dim)

    def call(tile: _Tile, grid, out_shape, warps, stages, extra=(), aliases=None):
        return pl.pallas_call(
            functools.partial(_kernel, t=tile),
            grid=grid,
            out_shape=out_shape,
            input_output_aliases=aliases or {},
            compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
            interpret=interpret,
            name="rpa_decode" if tile.decode else "rpa_prefill",
        )(*meta, *flat, *extra)

    def decode(out: jax.Array | None) -> jax.Array:
        """Decode rows written into `out` ([num_rows, D]), or a fresh buffer when None."""
        grid = (s_max, hkv, dec.num_splits)
        if dec.num_splits == 1:  # the kernel writes final rows in place
            if out is None:
                return call(dec, grid, out_shape, dec_warps, dec_stages)
            aliases = {len(meta) + len(flat): 0}
            return call(dec, grid, out_shape, dec_warps, dec_stages, (out,), aliases)
        partial_shape = (dec.num_splits, s_max, num_q_heads + 1)
        o_dec, m_dec, l_dec = call(
            dec, grid,
            (jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
             jax.ShapeDtypeStruct(partial_shape, jnp.float32),
             jax.ShapeDtypeStruct(partial_shape, jnp.float32)),
            dec_warps, dec_stages,
        )  # fmt: skip
        o_dec, m_dec, l_dec = o_dec[:, :, :num_q_heads], m_dec[:, :, :num_q_heads], l_dec[..., :-1]
        # Merge the splits: f32[S, Hq, D].
        m_max = jnp.max(m_dec, axis=0)  # f32[S, Hq]; log2 domain
        w = jnp.exp2(m_dec - m_max)  # f32[splits, S, Hq]
        l_tot = jnp.sum(l_dec * w, axis=0)
        o_seq = jnp.sum(o_dec * w[..., None], axis=0) / jnp.maximum(l_tot, 1e-30)[..., None]
        o_seq = o_seq.astype(q.dtype)
        if out is None:  # every row gets its sequence's row; chunk and padding rows come next
            rows = o_seq[_row_seqs(cu_q_lens, num_seqs, num_tokens)]  # [T, Hq, D]
            if decode_only:  # no chunk launch follows: zero the padding rows here
                pad = jnp.arange(num_tokens) >= cu_q_lens[num_seqs[0]]  # bool[T]
                rows = jnp.where(pad[:, None, None], jnp.zeros_like(rows), rows)
            rows = rows.reshape(-1, head_dim)
            return jnp.pad(rows, ((0, num_rows - rows.shape[0]), (0, 0)))
        live = (jnp.arange(s_max) < num_seqs[0]) & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)
        row = jnp.where(live, cu_q_lens[:-1], num_tokens)  # out of range: dropped
        out = out[: num_tokens * num_q_heads].reshape(num_tokens, num_q_heads, head_dim)
        return out.at[row].set(o_seq, mode="drop").reshape(num_rows, head_dim)

    # Calls with more rows than sequences (room for chunks) on Hopper: the Mosaic GPU prefill
    # kernel first, then decode rows into its output. Decode buckets (T <= S) and the rest:
    # decode first, then the Triton prefill launch, which also zeroes padding rows.
    if (
        sizes.hopper_prefill
        and num_tokens > s_max
        and not interpret
        and _is_hopper()
        and gpu_hopper.supported(q.dtype, head_dim, ps, sliding_window, soft_cap)
    ):
        out = gpu_hopper.prefill(
            q, k_pages, v_pages, page_tables, cu_q_lens, kv_lens, num_seqs, sm_scale=sm_scale,
            sizes=gpu_hopper.HopperBlockSizes(sizes.hopper_kv_tokens, sizes.hopper_stages),
        )  # fmt: skip
        return finish(decode(out.reshape(num_rows, head_dim)))
    if decode_only:
        return finish(decode(None))
    # Chunk tiles, then zero tiles for padding rows: enough for any ragged split (each chunk
    # adds at most one partial tile; there are at most min(S, T // 2) chunks).
    num_tiles = -(-num_tokens // pre.tokens) + min(s_max, num_tokens // 2) + 1
    out = call(
        pre, (num_tiles, hkv, 1), out_shape, sizes.prefill_warps, pre_stages,
        extra=(decode(None),), aliases={len(meta) + len(flat): 0},
    )  # fmt: skip
    return finish(out)


def _row_seqs(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int) -> jax.Array:
    """i32[T]: the (live) sequence each q row belongs to, clipped to S - 1."""
    max_num_seqs = cu_q_lens.shape[0] - 1
    rows = jnp.arange(num_tokens, dtype=jnp.int32)  # i32[T]
    live_seq = jnp.arange(max_num_seqs) < num_seqs[0]
    seq = jnp.sum((rows[:, None] >= cu_q_lens[None, 1:]) & live_seq, axis=1, dtype=jnp.int32)
    return jnp.minimum(seq, max_num_seqs - 1)


def _is_hopper() -> bool:
    """Whether the default device is an NVIDIA GPU of compute capability 9.x."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9"
    )
