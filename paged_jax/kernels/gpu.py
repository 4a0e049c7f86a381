"""Pallas GPU ragged paged attention: a Triton decode grid, and a Triton or Hopper prefill.

Two Triton launches share one kernel body, each specialised by static tile sizes:

- decode grid (S, Hkv, num_splits): one program per (sequence with q_len 1, kv head, kv split).
  All q heads of the kv head's group form the rows of one matmul (padded to 16 for the tensor
  cores). With one split the program writes its normalised rows straight into the output; with
  more, partial (acc, max, sum) go to one small merge launch (gpu_merge.py) that places the rows.
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
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from paged_jax.kernels import gpu_hopper, gpu_merge
from paged_jax.kernels.common import AttentionShape, check_attention_args
from paged_jax.kernels.gpu_body import Tile, kernel, pow2_ceil

_SHARED_BUDGET = 200 * 1024  # bytes per program: under the 227 KiB of an H100/H200


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Tile sizes and launch knobs of the GPU kernel."""

    # Defaults picked on an H100 (docs/kernels.md): decode is bandwidth-bound, prefill MMA-bound.
    decode_kv_tokens: int = 128  # kv tokens per loop step (whole pages; power of two)
    decode_warps: int = 4
    decode_stages: int = 2
    # Decode: split the context until the grid has this many programs. 1024 (H200, with the
    # one-launch merge of gpu_merge.py): 2 splits at 64 x 2048 ran 139.5 us against 151-152
    # for one pass, level elsewhere; with the old XLA merge 256 (no split at S * Hkv >= 256) won.
    target_programs: int = 1024
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
    group_pad = pow2_ceil(shape.group)
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
    dec = Tile(
        decode=True, rows=dec_rows, tokens=dec_rows // group_pad, pages_per_block=dec_ppb,
        num_splits=_num_splits(shape, dec_ppb, dec_target, sizes.max_splits),
        zero_dead=decode_only, **common,
    )  # fmt: skip
    pre_rows = max(16, group_pad, pow2_ceil(sizes.prefill_rows))
    pre_kv, pre_stages = _fit_shared(
        sizes.prefill_kv_tokens, sizes.prefill_stages, pre_rows, head_dim, isz, ps
    )
    pre = Tile(
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

    def call(tile: Tile, grid, out_shape, warps, stages, extra=(), aliases=None):
        return pl.pallas_call(
            functools.partial(kernel, t=tile),
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
        return gpu_merge.merge(
            cu_q_lens, num_seqs, o_dec, m_dec, l_dec, out_shape if out is None else out,
            group=shape.group, rows=dec_rows, num_q_heads=num_q_heads, num_tokens=num_tokens,
            zero_dead=decode_only, interpret=interpret,
        )  # fmt: skip

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


def _is_hopper() -> bool:
    """Whether the default device is an NVIDIA GPU of compute capability 9.x."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith(
        "9"
    )
