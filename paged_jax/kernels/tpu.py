"""Pallas Mosaic TPU ragged paged attention: page-table DMAs into VMEM, online softmax in f32.

Work is cut into items: a tile of up to `block_q` q rows of one sequence (a decode row is an
item of one row). A few jnp ops build the item table (sequence, first position, rows) and
gather each item's q rows into [Hkv, items, G * block_q, D], so every grid step owns aligned,
non-overlapping q and output blocks; the wrapper gathers output rows back to [T, Hq, D].

Grid (Hkv, items), both axes parallel: an item's DMAs start and finish inside its own grid
step, so megacore chips may split either axis over their two TensorCores. Scalar prefetch
(SMEM): kv_lens, the flattened page tables, the item table.
K/V pages stay in HBM (`pl.ANY`); each loop step copies `pages_per_block` pages per array
into one slot of a double-buffered VMEM scratch by async DMA, and starts the next step's copies
before computing on the current one. Pages past a tile's needs are not copied; slots past a
sequence's length are masked on the logits (-inf) and zeroed on V, so stale VMEM or freed
pages (NaN) never reach the output. All q heads of a kv head's group share each K/V block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from paged_jax.kernels.common import MASKED, check_attention_args


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Tile sizes of the TPU kernel."""

    block_q: int = 16  # q rows per item (multiple of 8; 16 keeps bf16 sublanes packed)
    kv_tokens_per_block: int = 128  # kv tokens per DMA step, rounded down to whole pages


DEFAULT_BLOCK_SIZES = TpuBlockSizes()


def chip_block_sizes() -> TpuBlockSizes:
    """The block sizes ``tpu_chips`` gives the default device's TPU generation; the defaults
    off a TPU (the interpreter, and lowering on CPU) or on a generation it does not know."""
    from paged_jax.kernels.tpu_chips import chip_of  # it imports this module

    device = jax.devices()[0]
    chip = chip_of(device.device_kind) if device.platform == "tpu" else None
    return chip.block_sizes if chip is not None else DEFAULT_BLOCK_SIZES


def _call_all(*fns) -> None:
    for fn in fns:
        fn()


def _kernel(
    kv_lens_ref,  # SMEM i32[S]
    tables_ref,  # SMEM i32[S * pages_per_seq]
    item_seq_ref,  # SMEM i32[N]
    item_pos_ref,  # SMEM i32[N]: absolute position of the item's first row
    item_rows_ref,  # SMEM i32[N]: live rows (0 for unused items)
    q_ref,  # VMEM [M, D], M = G * block_q (row g * block_q + i: head g, row i)
    k_hbm,  # HBM [Hkv, P, page_size, D]
    v_hbm,  # HBM [Hkv, P, page_size, D]
    o_ref,  # VMEM [M, D]
    k_buf,  # VMEM [2, pages_per_block, page_size, D]
    v_buf,  # VMEM [2, pages_per_block, page_size, D]
    sems,  # DMA semaphores [2 (k, v), 2 (slot)]
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    block_q: int,
    pages_per_seq: int,
):
    h, item = pl.program_id(0), pl.program_id(1)
    _, pages_per_block, page_size, head_dim = k_buf.shape
    rows = q_ref.shape[0]
    block_kv = pages_per_block * page_size
    seq = item_seq_ref[item]
    first_pos = item_pos_ref[item]
    num_rows = item_rows_ref[item]
    kv_len = kv_lens_ref[seq]

    kv_hi = jnp.where(num_rows > 0, first_pos + num_rows, 0)  # kv tokens the item needs
    if sliding_window is None:
        kv_lo = 0
    else:
        kv_lo = jnp.maximum(first_pos - sliding_window + 1, 0)
    # lax.div/rem, not // and %: operands are >= 0 and jnp's floor forms lower via sign().
    page_lo = lax.div(jnp.int32(kv_lo), page_size)
    page_hi = lax.div(kv_hi + page_size - 1, page_size)
    num_blocks = lax.div(jnp.maximum(page_hi - page_lo + pages_per_block - 1, 0), pages_per_block)

    def copies(block, slot):
        """(page is needed, K copy, V copy) for each page of a block."""
        out = []
        for p in range(pages_per_block):
            page = page_lo + block * pages_per_block + p
            needed = page < page_hi
            col = jnp.minimum(page, pages_per_seq - 1)
            page_id = tables_ref[seq * pages_per_seq + col]
            k_copy = pltpu.make_async_copy(
                k_hbm.at[h, page_id], k_buf.at[slot, p], sems.at[0, slot]
            )
            v_copy = pltpu.make_async_copy(
                v_hbm.at[h, page_id], v_buf.at[slot, p], sems.at[1, slot]
            )
            out.append((needed, k_copy, v_copy))
        return out

    def start(block, slot):
        for needed, k_copy, v_copy in copies(block, slot):
            pl.when(needed)(functools.partial(_call_all, k_copy.start, v_copy.start))

    def wait(block, slot):
        for needed, k_copy, v_copy in copies(block, slot):
            pl.when(needed)(functools.partial(_call_all, k_copy.wait, v_copy.wait))

    row = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)  # i32[M, BK]
    col = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)  # i32[M, BK]
    row_in_item = lax.rem(row, block_q)  # i32[M, BK]
    pos = first_pos + row_in_item  # absolute position of each row
    row_live = row_in_item < num_rows
    q = q_ref[...]  # [M, D]

    @pl.when(num_blocks > 0)
    def _():
        start(0, 0)

    def body(j, carry):
        m, l, acc = carry  # f32[M, 1], f32[M, 1], f32[M, D]
        slot = lax.rem(j, 2)

        @pl.when(j + 1 < num_blocks)
        def _():
            start(j + 1, 1 - slot)

        wait(j, slot)
        kv_pos = (page_lo + j * pages_per_block) * page_size + col  # i32[M, BK]
        in_len = kv_pos < kv_len
        mask = in_len & (kv_pos <= pos) & row_live
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        k = k_buf[slot].reshape(block_kv, head_dim)  # [BK, D]
        v = v_buf[slot].reshape(block_kv, head_dim)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # f32[M, BK]
        s = s * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)  # exactly 0 where masked
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        # Stale VMEM (pages not copied) or freed slots may hold NaN: zero those V rows.
        v_ok = (kv_pos[:1] < jnp.minimum(kv_len, kv_hi)).reshape(block_kv, 1)  # bool[BK, 1]
        v = jnp.where(v_ok, v, jnp.zeros_like(v))
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # f32[M, D]
        return m_new, l, alpha * acc + pv

    init = (
        jnp.full((rows, 1), MASKED, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    _, l, acc = lax.fori_loop(0, num_blocks, body, init)
    o_ref[...] = (acc / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)


def _item_table(cu_q_lens, kv_lens, num_seqs, block_q: int, num_items: int):
    """Per item: sequence, absolute position of its first row, live rows; per q row: its item."""
    # cu_q_lens: i32[S+1]; kv_lens: i32[S]; num_seqs: i32[1]
    max_num_seqs = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # i32[S]
    live = jnp.arange(max_num_seqs) < num_seqs[0]
    tiles = jnp.where(live, (q_lens + block_q - 1) // block_q, 0)  # i32[S]
    ends = jnp.cumsum(tiles)  # i32[S]
    items = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.sum(items[:, None] >= ends[None, :], axis=1), max_num_seqs - 1)
    tile = items - (ends[seq] - tiles[seq])  # i32[N]
    used = items < ends[-1]
    rows = jnp.where(used, jnp.clip(q_lens[seq] - tile * block_q, 0, block_q), 0)
    first_pos = kv_lens[seq] - q_lens[seq] + tile * block_q
    first_row = cu_q_lens[seq] + tile * block_q  # packed q row of the item's first row
    return seq.astype(jnp.int32), first_pos, rows, first_row, ends - tiles


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
    block_sizes: TpuBlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Ragged paged attention on TPU (contract: docs/kernels.md); returns q.dtype [T, Hq, D].

    `interpret=pltpu.InterpretParams()` runs the kernel in the TPU interpreter (on CPU).
    ``block_sizes`` None: the table's for this TPU generation (``tpu_chips``), else defaults.
    """
    block_sizes = block_sizes or chip_block_sizes()
    # q: [T, Hq, D]; k_pages/v_pages: [Hkv, P, page_size, D]; kv_lens: i32[S]
    # page_tables: i32[S, max_pages_per_seq]; cu_q_lens: i32[S+1]; num_seqs: i32[1]
    shape = check_attention_args(
        q, k_pages, v_pages, kv_lens, page_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    block_q = block_sizes.block_q
    if block_q < 1 or block_q % 8:
        raise ValueError(f"{block_q=} must be a positive multiple of 8")
    t, hq, d = shape.num_tokens, shape.num_q_heads, shape.head_dim
    hkv, group, ps = shape.num_kv_heads, shape.group, shape.page_size
    pages_per_block = max(1, min(block_sizes.kv_tokens_per_block // ps, shape.pages_per_seq))
    num_items = t // block_q + shape.max_num_seqs + 1  # >= sum over seqs of cdiv(q_len, block_q)
    rows = group * block_q

    seq, first_pos, item_rows, first_row, item_start = _item_table(
        cu_q_lens, kv_lens, num_seqs, block_q, num_items
    )  # i32[N] each; item_start i32[S]: first item of each sequence
    # q rows of every item: [Hkv, N, G * block_q, D] (rows past the item's end are don't-care).
    row_idx = jnp.clip(first_row[:, None] + jnp.arange(block_q)[None, :], 0, t - 1)  # i32[N, bq]
    q_items = q.reshape(t, hkv, group, d)[row_idx]  # [N, bq, Hkv, G, D]
    q_items = q_items.transpose(2, 0, 3, 1, 4).reshape(hkv, num_items, rows, d)

    kernel = functools.partial(
        _kernel, sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
        block_q=block_q, pages_per_seq=shape.pages_per_seq,
    )  # fmt: skip
    block = pl.BlockSpec((None, None, rows, d), lambda h, i, *_: (h, i, 0, 0))
    out_items = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(hkv, num_items),
            in_specs=[
                block,
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=block,
            scratch_shapes=[
                pltpu.VMEM((2, pages_per_block, ps, d), k_pages.dtype),
                pltpu.VMEM((2, pages_per_block, ps, d), v_pages.dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((hkv, num_items, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(kv_lens, page_tables.reshape(-1), seq, first_pos, item_rows, q_items, k_pages, v_pages)

    # Back to packed rows: row r of sequence s is row (r - cu[s]) % bq of item start[s] + ...
    out_items = out_items.reshape(hkv, num_items, group, block_q, d)
    rows_all = jnp.arange(t, dtype=jnp.int32)
    live_seq = jnp.arange(shape.max_num_seqs) < num_seqs[0]
    row_seq = jnp.sum((rows_all[:, None] >= cu_q_lens[None, 1:]) & live_seq, axis=1)
    row_seq = jnp.minimum(row_seq, shape.max_num_seqs - 1)  # i32[T]
    in_seq = rows_all - cu_q_lens[row_seq]
    row_item = jnp.clip(item_start[row_seq] + in_seq // block_q, 0, num_items - 1)
    out = out_items[:, row_item, :, in_seq % block_q]  # [T, Hkv, G, D]
    out = out.reshape(t, hq, d)
    live_row = rows_all < cu_q_lens[num_seqs[0]]
    return jnp.where(live_row[:, None, None], out, jnp.zeros_like(out))
