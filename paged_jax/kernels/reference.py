"""Plain-jnp ragged paged attention and KV writes: the CPU engine path and the kernels' yardstick.

Ragged paged attention (the contract in docs/kernels.md) is computed block by block over the
packed q rows.
A block whose live rows all belong to one sequence (prefill chunks) gathers that sequence's
pages once and runs a small matmul per kv step; a block that spans several sequences (decode
rows, chunk boundaries) gathers pages per row. Each block loops over kv steps with an online
softmax, only as far as its rows' positions reach (a dynamic trip count), so a decode batch
costs about sum(kv_lens) and not max_num_seqs * max_pages_per_seq * page_size per row.

Freed pages are never cleared and may hold NaN: masked logits are replaced by -inf with
`jnp.where` (never multiplied), and V values past a sequence's length are zeroed before the
weighted sum, so garbage cannot leak through a 0 weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from paged_jax.kernels.common import MASKED, check_attention_args, check_write_args


@dataclasses.dataclass(frozen=True)
class ReferenceBlockSizes:
    """Tile sizes of the jnp reference (they change speed, never results beyond rounding)."""

    block_q: int = 16  # q rows per block
    block_kv: int = 256  # kv tokens per inner step, rounded down to whole pages (>= 1 page)


DEFAULT_BLOCK_SIZES = ReferenceBlockSizes()
# One q row per block: every row takes the one-sequence path with the same shapes whatever the
# batch, so its result does not depend on its neighbours (the engine's batch-invariant mode).
INVARIANT_BLOCK_SIZES = ReferenceBlockSizes(block_q=1)


def _row_metadata(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array, num_rows: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sequence id, absolute position and liveness of every packed q row."""
    # cu_q_lens: i32[S+1]; kv_lens: i32[S]; num_seqs: i32[1]
    max_num_seqs = kv_lens.shape[0]
    n = num_seqs[0]
    rows = jnp.arange(num_rows, dtype=jnp.int32)  # i32[T]
    live_seq = jnp.arange(max_num_seqs) < n  # bool[S]
    # Count live sequences that end at or before the row; robust to garbage past num_seqs.
    ends_before = (rows[:, None] >= cu_q_lens[None, 1:]) & live_seq[None, :]  # bool[T, S]
    seq = jnp.minimum(jnp.sum(ends_before, axis=1, dtype=jnp.int32), max_num_seqs - 1)  # i32[T]
    valid = rows < cu_q_lens[n]  # bool[T]
    start = cu_q_lens[seq]  # i32[T]
    q_len = cu_q_lens[seq + 1] - start  # i32[T]
    pos = kv_lens[seq] - q_len + rows - start  # i32[T]
    return seq, pos, valid


def _gather_pages(pages: jax.Array, page_ids: jax.Array) -> jax.Array:
    """``pages[:, page_ids]`` (ids clipped into range), gathered from the pages viewed as
    [Hkv * P, page_size, D]: XLA's gather writes its index dims first, so this yields the
    head-major layout the per-head dots read, with no transpose pass over the gathered K/V."""
    # pages: [Hkv, P, page_size, D]; page_ids: i32[...] -> [Hkv, ..., page_size, D]
    num_kv_heads, num_pages = pages.shape[:2]
    flat = pages.reshape(num_kv_heads * num_pages, *pages.shape[2:])  # free reshape
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32).reshape(-1, *(1,) * page_ids.ndim)
    ids = heads * num_pages + jnp.clip(page_ids, 0, num_pages - 1)[None]  # i32[Hkv, ...]
    return jnp.take(flat, ids, axis=0, mode="clip")


def _attend_block(
    q_blk: jax.Array,
    seq_blk: jax.Array,
    pos_blk: jax.Array,
    valid_blk: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_tables: jax.Array,
    *,
    pages_per_step: int,
    sliding_window: int | None,
    soft_cap: float | None,
    one_step: bool,
    per_row: bool,
) -> jax.Array:
    """Attention of one block of q rows over their sequences' pages; f32[bq, Hkv, G, D].

    ``one_step``: the whole page table is one kv step (no window), so the step runs once with
    no loop; ``per_row``: take the per-row gather without testing for one sequence (decode)."""
    # q_blk: f32[bq, Hkv, G, D] (already scaled); seq/pos/valid_blk: [bq]
    # k_pages/v_pages: [Hkv, P, page_size, D]; page_tables: i32[S, pages_padded]
    block_q, num_kv_heads, group, head_dim = q_blk.shape
    page_size = k_pages.shape[2]
    step_len = pages_per_step * page_size
    kv_len_blk = jnp.where(valid_blk, kv_lens[seq_blk], 0)  # i32[bq]
    tables_blk = page_tables[seq_blk]  # i32[bq, pages_padded]
    one_seq = jnp.all((seq_blk == seq_blk[0]) | ~valid_blk)

    hi = jnp.max(jnp.where(valid_blk, pos_blk + 1, 0))  # kv tokens the block needs
    num_steps_hi = (hi + step_len - 1) // step_len
    if sliding_window is None:
        num_steps_lo = jnp.int32(0)
    else:
        lo = jnp.min(jnp.where(valid_blk, pos_blk - sliding_window + 1, hi))
        num_steps_lo = jnp.maximum(lo, 0) // step_len

    def step(j, carry, *, shared: bool):
        m, l, acc = carry  # f32[bq, Hkv, G], f32[bq, Hkv, G], f32[bq, Hkv, G, D]
        kv_pos = j * step_len + jnp.arange(step_len, dtype=jnp.int32)  # i32[kc]
        in_len = kv_pos[None, :] < kv_len_blk[:, None]  # bool[bq, kc]
        mask = in_len & (kv_pos[None, :] <= pos_blk[:, None])
        if sliding_window is not None:
            mask &= kv_pos[None, :] > pos_blk[:, None] - sliding_window
        if shared:
            page_ids = lax.dynamic_slice_in_dim(tables_blk[0], j * pages_per_step, pages_per_step)
            k = _gather_pages(k_pages, page_ids)  # [Hkv, pps, page_size, D]
            v = _gather_pages(v_pages, page_ids)
            k = k.reshape(num_kv_heads, step_len, head_dim).astype(jnp.float32)  # f32[Hkv, kc, D]
            v = v.reshape(num_kv_heads, step_len, head_dim).astype(jnp.float32)
            v = jnp.where(in_len[0][None, :, None], v, 0.0)  # rows share one kv_len
            s = jnp.einsum("hkd,rhgd->rhgk", k, q_blk, precision=lax.Precision.HIGHEST)
        else:
            page_ids = lax.dynamic_slice_in_dim(tables_blk, j * pages_per_step, pages_per_step, 1)
            k = _gather_pages(k_pages, page_ids)  # [Hkv, bq, pps, ps, D]
            v = _gather_pages(v_pages, page_ids)
            k = k.reshape(num_kv_heads, block_q, step_len, head_dim).astype(jnp.float32)
            v = v.reshape(num_kv_heads, block_q, step_len, head_dim).astype(jnp.float32)
            v = jnp.where(in_len[None, :, :, None], v, 0.0)  # f32[Hkv, bq, kc, D]
            q_hr = jnp.swapaxes(q_blk, 0, 1)  # f32[Hkv, bq, G, D]
            s = jnp.einsum("hrkd,hrgd->hrgk", k, q_hr, precision=lax.Precision.HIGHEST)
            s = jnp.swapaxes(s, 0, 1)  # f32[bq, Hkv, G, kc]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)  # f32[bq, Hkv, G, kc]
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])  # exactly 0 where masked
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=-1)
        if shared:
            pv = jnp.einsum("rhgk,hkd->rhgd", p, v, precision=lax.Precision.HIGHEST)
        else:
            p_hr = jnp.swapaxes(p, 0, 1)  # f32[Hkv, bq, G, kc]
            pv = jnp.einsum("hrgk,hrkd->hrgd", p_hr, v, precision=lax.Precision.HIGHEST)
            pv = jnp.swapaxes(pv, 0, 1)  # f32[bq, Hkv, G, D]
        return m_new, l, alpha[..., None] * acc + pv

    init = (
        jnp.full((block_q, num_kv_heads, group), MASKED, jnp.float32),
        jnp.zeros((block_q, num_kv_heads, group), jnp.float32),
        jnp.zeros((block_q, num_kv_heads, group, head_dim), jnp.float32),
    )

    def run(shared: bool):
        body = functools.partial(step, shared=shared)
        if one_step:  # a block that needs no kv token is fully masked: l stays 0
            return body(jnp.int32(0), init)
        return lax.fori_loop(num_steps_lo, num_steps_hi, body, init)

    if per_row:
        _, l, acc = run(False)
    else:
        _, l, acc = lax.cond(one_seq, lambda: run(True), lambda: run(False))
    return acc / jnp.maximum(l, 1e-30)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_sizes", "decode_only"),
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
    block_sizes: ReferenceBlockSizes = DEFAULT_BLOCK_SIZES,
    decode_only: bool = False,
) -> jax.Array:
    """Ragged paged attention in plain jnp (contract: docs/kernels.md); returns q.dtype [T, Hq, D].

    Rows past cu_q_lens[num_seqs] are padding and come back as 0. ``decode_only``: the
    caller's promise that every live sequence has q_len 1 (blocks take the per-row gather
    without a ``lax.cond``). On XLA CPU every loop and branch is a runtime call around small
    kernels, so a step whose page table fits one kv step runs without loops.
    """
    # q: [T, Hq, D]; k_pages/v_pages: [Hkv, P, page_size, D]; kv_lens: i32[S]
    # page_tables: i32[S, max_pages_per_seq]; cu_q_lens: i32[S+1]; num_seqs: i32[1]
    shape = check_attention_args(
        q, k_pages, v_pages, kv_lens, page_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    if block_sizes.block_q < 1 or block_sizes.block_kv < 1:
        raise ValueError(f"{block_sizes=} must have positive sizes")
    num_tokens, group = shape.num_tokens, shape.group
    block_q = min(block_sizes.block_q, max(num_tokens, 1))
    pages_per_step = max(1, min(block_sizes.block_kv // shape.page_size, shape.pages_per_seq))
    pad_pages = -shape.pages_per_seq % pages_per_step
    tables = jnp.pad(page_tables, ((0, 0), (0, pad_pages)))  # i32[S, pages_padded]; pad = page 0

    seq, pos, valid = _row_metadata(cu_q_lens, kv_lens, num_seqs, num_tokens)  # [T] each
    num_blocks = -(-num_tokens // block_q)
    pad_rows = num_blocks * block_q - num_tokens
    qf = q.astype(jnp.float32) * sm_scale
    qf = qf.reshape(num_tokens, shape.num_kv_heads, group, shape.head_dim)  # f32[T, Hkv, G, D]
    qf = jnp.pad(qf, ((0, pad_rows), (0, 0), (0, 0), (0, 0)))
    seq_p = jnp.pad(seq, (0, pad_rows))  # i32[T_pad]
    pos_p = jnp.pad(pos, (0, pad_rows))
    valid_p = jnp.pad(valid, (0, pad_rows))  # padding rows are not live

    one_step = sliding_window is None and pages_per_step == tables.shape[1]

    def one_block(xs):
        q_blk, seq_blk, pos_blk, valid_blk = xs
        return _attend_block(
            q_blk, seq_blk, pos_blk, valid_blk, k_pages, v_pages, kv_lens, tables,
            pages_per_step=pages_per_step, sliding_window=sliding_window, soft_cap=soft_cap,
            one_step=one_step, per_row=decode_only,
        )  # fmt: skip

    blocks = (
        qf.reshape(num_blocks, block_q, *qf.shape[1:]),
        seq_p.reshape(num_blocks, block_q),
        pos_p.reshape(num_blocks, block_q),
        valid_p.reshape(num_blocks, block_q),
    )
    if num_blocks == 1:
        out = one_block(tuple(x[0] for x in blocks))[None]
    else:
        out = lax.map(one_block, blocks)  # f32[num_blocks, bq, Hkv, G, D]
    out = out.reshape(num_blocks * block_q, shape.num_q_heads, shape.head_dim)[:num_tokens]
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new tokens' K/V into their slots (slot = page * page_size + offset).

    One scatter per array on a free reshape of the pages, so XLA updates the pages in place
    when the caller's jit donates them. Slots out of range are dropped; padding tokens should
    map into NULL_PAGE (page 0), whose contents are never read as live data.
    """
    # k_pages/v_pages: [Hkv, P, page_size, D]; k_new/v_new: [T, Hkv, D]; slot_mapping: i32[T]
    check_write_args(k_pages, v_pages, k_new, v_new, slot_mapping)
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape

    def put(pages: jax.Array, new: jax.Array) -> jax.Array:
        flat = pages.reshape(num_kv_heads, num_pages * page_size, head_dim)  # [Hkv, P*ps, D]
        rows = jnp.swapaxes(new, 0, 1).astype(pages.dtype)  # [Hkv, T, D]
        return flat.at[:, slot_mapping].set(rows, mode="drop").reshape(pages.shape)

    return put(k_pages, k_new), put(v_pages, v_new)
