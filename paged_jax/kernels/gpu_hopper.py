"""Hopper prefill kernel (Pallas Mosaic GPU): the chunk rows of ragged paged attention.

Flash attention in the FlashAttention-3 shape (warp-specialised, TMA + wgmma), reading K/V
through the page tables. A unit of work is (tile, q head), a tile being up to 128 consecutive
q rows of one chunk from an 8-aligned row; the grid is persistent (one CTA per SM, CTA c runs
units c, c + num_ctas, ...), and per CTA:

- warpgroup 2 is the producer: per kv block it reads the block's page ids (scalar loads) and
  issues one TMA copy per page for K and for V into a `stages`-deep ring of shared memory;
  each ring slot's barrier expects one arrival per page. The ring runs on across units.
- warpgroups 0 and 1 compute 64 rows each: S = Q K^T and O += P V on the tensor cores
  (wgmma), online softmax in f32 in the log2 domain in between, taking turns on the tensor
  cores (one's softmax overlaps the other's matmuls). Blocks every owned row sees in full
  skip the mask; diagonal and tail blocks mask by position. Slots past a sequence's length
  in its last block are garbage (NaN in the tests): logits there become -inf, and the V rows
  are overwritten with zeros in shared memory before the PV product (0 * NaN would leak).
- the output goes through shared memory and TMA stores of 64, 32, ..., 1 rows, so a tile
  writes exactly its own rows; rows of other sequences are never touched.

The tiles come from `gpu_tiles.tile_table` (one Triton launch): chunk tiles first, then zero
tiles that write zeros over the padding rows past cu_q_lens[num_seqs]. Decode rows (q_len 1)
are left alone: the Triton decode kernel writes them afterwards.

Mosaic GPU runs on the CPU only through its interpreter (`interpret=InterpretGPUParams()`),
which the CPU tests use; only bf16/f16 with head_dim 64/128 and page_size >= 8 are handled
here, without sliding window or soft cap (gpu.py falls back to the Triton prefill otherwise).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from paged_jax.kernels import gpu_tiles
from paged_jax.kernels.common import LOG2E, MASKED

ROWS = 64  # q rows per compute warpgroup: one wgmma M tile
TILE = 2 * ROWS  # q tokens per CTA (two compute warpgroups)


@dataclasses.dataclass(frozen=True)
class HopperBlockSizes:
    """kv tokens per pipeline step and the depth of the K/V ring in shared memory."""

    block_kv: int = 128  # a multiple of 64 (V rows are zeroed in 64-row wgmma tiles)
    stages: int = 2

    def __post_init__(self) -> None:
        if self.block_kv % ROWS or self.stages < 2:
            raise ValueError(f"{self.block_kv=} must be a multiple of {ROWS}, {self.stages=} >= 2")


def supported(dtype, head_dim: int, page_size: int, sliding_window, soft_cap) -> bool:
    """Whether this kernel handles a call with these static options."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim in (64, 128)
        and 8 <= page_size <= 128
        and page_size & (page_size - 1) == 0
        and sliding_window is None
        and soft_cap is None
    )


def _kernel(items_ref, count_ref, tables_ref, q_ref, k_ref, v_ref, out_ref, smem, barriers, *,
            sm_scale: float, sizes: HopperBlockSizes, num_ctas: int, interpret: bool):  # fmt: skip
    """Persistent: CTA c runs units c, c + num_ctas, ... (unit = tile * Hq + q head)."""
    qo_smem, o_smem, k_smem, v_smem = smem
    k_ready, v_ready, q_ready, k_free, v_free, turn = barriers
    num_tokens, num_q_heads, head_dim = q_ref.shape
    num_kv_heads, num_pages, page_size, _ = k_ref.shape
    pages_per_seq = tables_ref.shape[1]
    bk, stages = sizes.block_kv, sizes.stages
    pages_per_block = bk // page_size
    dtype = q_ref.dtype
    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
    num_units = count_ref[0] * num_q_heads
    my_units = lax.div(jnp.maximum(num_units - cta, 0) + num_ctas - 1, num_ctas)

    def unit(k):
        """(head, seq, tile base row, first and end owned rows, position offset, kv_len, blocks)."""
        u = cta + k * num_ctas
        item, head = lax.div(u, num_q_heads), lax.rem(u, num_q_heads)
        seq, base, lo, hi, pos_off, kv_len = (items_ref[item, f] for f in range(6))
        kv_hi = jnp.where(hi > lo, jnp.minimum(pos_off + hi, kv_len), 0)
        return head, seq, base, lo, hi, pos_off, kv_len, lax.div(kv_hi + bk - 1, bk)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem, o_w = qo_smem.at[wg], o_smem.at[wg]
        scale = sm_scale * LOG2E

        def meet():  # ping-pong: one warpgroup's softmax overlaps the other's matmuls
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def run_unit(k, g):  # g: pipeline steps consumed before this unit
            head, _, base, lo, hi, pos_off, kv_len, num_blocks = unit(k)
            box0 = base + wg * ROWS  # this warpgroup's 64 rows, 8-aligned
            box = pl.multiple_of(jnp.minimum(box0, num_tokens - ROWS), 8)  # inside q
            first = jnp.maximum(lo, box0)
            count = jnp.maximum(jnp.minimum(hi, box0 + ROWS) - first, 0)  # rows owned
            kv_hi = jnp.where(count > 0, jnp.minimum(pos_off + first + count, kv_len), 0)
            blocks = lax.div(kv_hi + bk - 1, bk)
            full = jnp.clip(lax.div(pos_off + first + 1, bk), 0, blocks)  # seen whole by all
            plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(box, ROWS), head], q_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            m = _layout(jnp.full((ROWS,), MASKED, jnp.float32), interpret, rows=True)
            l = _layout(jnp.full((ROWS,), 0.0, jnp.float32), interpret, rows=True)
            acc = _layout(jnp.zeros((ROWS, head_dim), jnp.float32), interpret)

            def step(j, carry, masked: bool):
                acc, m, l = carry
                slot = lax.rem(g + j, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                s = _qk(q_smem, k_smem.at[slot], meet, interpret)  # f32[64, BK]
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    row = _iota((ROWS, bk), 0, interpret)
                    kv_pos = j * bk + _iota((ROWS, bk), 1, interpret)
                    keep = (kv_pos <= pos_off + box + row) & (kv_pos < kv_len)
                    s = jnp.where(keep, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(axis=1) * scale)
                p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                alpha = jnp.exp2(m - m_new)
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_arrive(turn)  # softmax done
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)  # the tensor cores are ours
                if masked:
                    _zero_tail(v_smem.at[slot], kv_len - j * bk, head_dim, interpret)
                acc = _pv(acc, p.astype(dtype), v_smem.at[slot], interpret)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            pl.when(wg == 1)(meet)  # warpgroup 1 runs half a step behind warpgroup 0
            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m, l))
            acc, m, l = lax.fori_loop(full, blocks, functools.partial(step, masked=True), carry)

            @pl.loop(blocks, num_blocks)
            def _release(j):
                # Blocks only the other warpgroup needs. Waiting for each to land first keeps
                # this warpgroup from arriving twice on one phase of a slot's free barrier.
                slot = lax.rem(g + j, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                meet()  # the two meetings of a step, to stay in step with the other
                meet()
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])

            pl.when(wg == 0)(meet)
            out = acc / lax.broadcast_in_dim(jnp.maximum(l, 1e-30), acc.shape, [0])
            o_w[...] = out.astype(dtype)
            plgpu.commit_smem()
            _store_rows(o_w, out_ref.at[:, head], box, first - box, count)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_w is free again
            return g + num_blocks

        lax.fori_loop(0, my_units, run_unit, jnp.int32(0))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")

        def fill(pages, slot, kv_head, ref, smem_ref, ready):
            for i, page in enumerate(pages):
                plgpu.copy_gmem_to_smem(
                    ref.at[kv_head, page],
                    smem_ref.at[slot, pl.ds(i * page_size, page_size)],
                    ready.at[slot],
                )

        def run_unit(k, g):
            head, seq, _, _, _, _, _, num_blocks = unit(k)
            kv_head = lax.div(head, num_q_heads // num_kv_heads)

            @pl.loop(0, num_blocks)
            def _block(j):
                slot = lax.rem(g + j, stages)
                cols = [jnp.minimum(j * pages_per_block + i, pages_per_seq - 1)
                        for i in range(pages_per_block)]  # fmt: skip
                pages = [jnp.clip(tables_ref[seq, c], 0, num_pages - 1) for c in cols]

                @pl.when(g + j >= stages)  # the slot's last user has released it
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                fill(pages, slot, kv_head, k_ref, k_smem, k_ready)

                @pl.when(g + j >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                fill(pages, slot, kv_head, v_ref, v_smem, v_ready)

            return g + num_blocks

        total = lax.fori_loop(0, my_units, run_unit, jnp.int32(0))

        @pl.loop(jnp.maximum(total - stages, 0), total)
        def _drain(g):  # observe the last releases too: every phase of a barrier is waited on
            plgpu.barrier_wait(k_free.at[lax.rem(g, stages)])
            plgpu.barrier_wait(v_free.at[lax.rem(g, stages)])


def _qk(q_smem, k_block, meanwhile, interpret: bool) -> jax.Array:
    """f32[64, BK] = Q K^T on the tensor cores; `meanwhile()` runs while the wgmma is in flight.

    The interpreter's wgmma takes neither a transposed nor a register operand: a plain dot.
    """
    if interpret:
        meanwhile()
        dims = (((1,), (1,)), ((), ()))
        return lax.dot_general(q_smem[...], k_block[...], dims, preferred_element_type=jnp.float32)

    def scoped(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_block, (1, 0)))
        meanwhile()
        return acc_ref[...]

    return pl.run_scoped(scoped, plgpu.ACC((q_smem.shape[0], k_block.shape[0]), jnp.float32))


def _pv(acc: jax.Array, p: jax.Array, v_block, interpret: bool) -> jax.Array:
    """acc + P V, P from registers, accumulated in place by wgmma."""
    if interpret:
        return acc + jnp.dot(p, v_block[...], preferred_element_type=jnp.float32)
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_block))(plgpu.ACC.init(acc))


def _layout(x: jax.Array, interpret: bool, rows: bool = False) -> jax.Array:
    """x in the wgmma register layout (its row-vector form when `rows`); as is when interpreted."""
    if interpret:
        return x
    layout = plgpu.Layout.WGMMA.reduce(1) if rows else plgpu.Layout.WGMMA
    return plgpu.layout_cast(x, layout)


def _iota(shape: tuple[int, int], dim: int, interpret: bool) -> jax.Array:
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, dim)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def _store_rows(o_tile, out_rows, base, shift, num_rows) -> None:
    """TMA stores of 64, 32, ..., 1 rows: smem rows [shift, shift + num_rows) of the tile to
    out rows base + shift on, so exactly the tile's own rows are written."""
    offset, n = shift, o_tile.shape[0]
    while n:
        take = num_rows & n

        @pl.when(take != 0)
        def _store(offset=offset, n=n):
            plgpu.copy_smem_to_gmem(
                o_tile.at[pl.ds(offset, n)], out_rows.at[pl.ds(base + offset, n)]
            )

        offset = offset + take
        n //= 2


def _zero_tail(v_block, valid, head_dim: int, interpret: bool) -> None:
    """Zero rows >= valid of one V block in shared memory (generic stores, then a fence)."""
    bk = v_block.shape[0]

    @pl.when(valid < bk)
    def _():
        row = _iota((ROWS, head_dim), 0, interpret)
        for r0 in range(0, bk, ROWS):
            part = v_block.at[pl.ds(r0, ROWS)]
            v = part[...]
            part[...] = jnp.where(row + r0 < valid, v, jnp.zeros_like(v))
        plgpu.commit_smem()


def prefill(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sizes: HopperBlockSizes = HopperBlockSizes(),
    interpret=None,
) -> jax.Array:
    """[T, Hq, D]: chunk rows attended, padding rows zero, decode rows (q_len 1) unwritten."""
    # q: [T, Hq, D]; k_pages/v_pages: [Hkv, P, page_size, D]; page_tables: i32[S, pages]
    num_tokens, num_q_heads, head_dim = q.shape
    page_size = k_pages.shape[2]
    bk = max(sizes.block_kv, page_size)
    sizes = dataclasses.replace(sizes, block_kv=bk)
    # q boxes are 64 rows at 8-aligned offsets: at least 64 rows, a multiple of 8.
    pad = max(ROWS, -(-num_tokens // 8) * 8) - num_tokens
    if pad:
        q = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    items, count = gpu_tiles.tile_table(
        cu_q_lens,
        kv_lens,
        num_seqs,
        num_tokens=num_tokens,
        tile=TILE,
        interpret=interpret is not None,
    )
    n_items = items.shape[0]
    num_ctas = min(n_items * num_q_heads, _num_sms() if interpret is None else 3)
    swizzle = 128
    tiled = (
        plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )
    smem = (
        plgpu.SMEM((2, ROWS, head_dim), q.dtype, transforms=tiled),  # q tiles
        plgpu.SMEM((2, ROWS, head_dim), q.dtype),  # output tiles (untiled: any row slice)
        plgpu.SMEM((sizes.stages, bk, head_dim), q.dtype, transforms=tiled),
        plgpu.SMEM((sizes.stages, bk, head_dim), q.dtype, transforms=tiled),
    )
    pages_per_block = bk // page_size
    barriers = (
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=sizes.stages),  # K landed
        plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=sizes.stages),  # V landed
        plgpu.Barrier(num_barriers=2),  # q tiles landed
        plgpu.Barrier(num_arrivals=2, num_barriers=sizes.stages),  # K slot free
        plgpu.Barrier(num_arrivals=2, num_barriers=sizes.stages),  # V slot free
        plgpu.Barrier(num_arrivals=2),  # compute warpgroups take turns
    )
    out = plgpu.kernel(
        functools.partial(
            _kernel,
            sm_scale=float(sm_scale),
            sizes=sizes,
            num_ctas=num_ctas,
            interpret=interpret is not None,
        ),
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=(smem, barriers),
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )(items, count, page_tables, q, k_pages, v_pages)
    return out[:num_tokens] if pad else out


def _num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132 on an H100 or H200 SXM)."""
    return int(getattr(jax.devices()[0], "core_count", 132) or 132)
