"""The Triton kernel body of the Pallas GPU ragged paged attention (``kernels/gpu.py``).

One body serves both launches; a static ``Tile`` (from ``gpu.ragged_paged_attention``)
specialises it into the decode grid program (sequence, kv head, kv split) or the prefill grid
program (chunk tile, kv head). ``gpu.py``'s docstring describes the loop and its masks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from paged_jax.kernels.common import LOG2E, MASKED

_MAX_SCALAR_PAGES = 16  # more pages per loop step than this: one vector load of page ids


def pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


@dataclasses.dataclass(frozen=True)
class Tile:
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


def tile_of_program(t: Tile, item, cu_q_lens_ref, num_seqs_ref, num_tokens: int):
    """Prefill: (sequence, tile index, used) of program `item`; zero tiles follow used ones."""
    max_num_seqs = cu_q_lens_ref.shape[0] - 1
    i = lax.broadcasted_iota(jnp.int32, (pow2_ceil(max_num_seqs),), 0)  # i32[S']
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


def kernel(
    kv_lens_ref,  # i32[S]
    cu_q_lens_ref,  # i32[S+1]
    num_seqs_ref,  # i32[1]
    page_tables_ref,  # i32[S, pages_per_seq]
    q_ref,  # [T * Hq, D]
    k_ref,  # [Hkv * P * page_size, D]: the page array, flattened to kv rows
    v_ref,  # [Hkv * P * page_size, D]
    *out_refs,  # see ragged_paged_attention: decode partials or the [R, D] output
    t: Tile,
):
    item, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[1]
    num_tokens = q_ref.shape[0] // t.num_q_heads
    max_num_seqs, pages_per_seq = page_tables_ref.shape
    block_kv, ps = t.block_kv, t.page_size

    if t.decode:
        seq, tile = item, 0
    else:
        seq, tile, used, zero_first, zero_rows = tile_of_program(
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
