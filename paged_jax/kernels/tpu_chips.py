"""TPU generations: what the kernel's tile choice and the lowering script's VMEM check need.

Figures are public spec-sheet leads (HBM size and bandwidth per chip, TensorCores per chip);
VMEM sizes and the compiler's default scoped-VMEM limit are as reported for each generation
and are checked by nothing here (no TPU): docs/tpu.md lists what the first real run must
confirm. Block sizes are starting points sized to the scoped limit, not tuned on a chip.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from paged_jax.kernels.tpu import TpuBlockSizes

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class TpuChip:
    name: str
    hbm_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float
    tensor_cores: int  # 2: megacore (the kernel's parallel grid axes split over both)
    vmem_bytes: int
    scoped_vmem_bytes: int  # the compiler's default limit for one kernel's VMEM
    page_size: int  # suggested KV page size (DMA of page_size * head_dim * 2 bytes per page)
    block_sizes: TpuBlockSizes


CHIPS = {
    "v4": TpuChip("v4", 32 * 2**30, 1.2e12, 275e12, 2, 32 * MiB, 16 * MiB, 32,
                  TpuBlockSizes(block_q=16, kv_tokens_per_block=128)),
    "v5e": TpuChip("v5e", 16 * 10**9, 819e9, 197e12, 1, 128 * MiB, 16 * MiB, 32,
                   TpuBlockSizes(block_q=16, kv_tokens_per_block=128)),
    "v5p": TpuChip("v5p", 95 * 10**9, 2.765e12, 459e12, 2, 95 * MiB, 16 * MiB, 32,
                   TpuBlockSizes(block_q=16, kv_tokens_per_block=256)),
    "v6e": TpuChip("v6e", 32 * 10**9, 1.64e12, 918e12, 1, 128 * MiB, 32 * MiB, 32,
                   TpuBlockSizes(block_q=32, kv_tokens_per_block=256)),
}  # fmt: skip


def chip_of(device_kind: str) -> TpuChip | None:
    """The table's entry for a ``jax.Device.device_kind`` ("TPU v5 lite", "TPU v6 lite", ...)."""
    kind = device_kind.lower().replace(" ", "")
    if "v5lite" in kind or "v5e" in kind:
        return CHIPS["v5e"]
    if "v6lite" in kind:
        return CHIPS["v6e"]
    for name in ("v6e", "v5p", "v4"):
        if name in kind or (name == "v5p" and kind.endswith("v5")):
            return CHIPS[name]
    return None


def kernel_vmem_bytes(
    sizes: TpuBlockSizes, *, page_size: int, head_dim: int, group: int, dtype: jnp.dtype
) -> int:
    """VMEM one grid step of the TPU kernel holds: double-buffered K/V page blocks, the
    pipelined q and output blocks, and the f32 logits / probabilities / accumulator."""
    isz = jnp.dtype(dtype).itemsize
    pages = max(1, sizes.kv_tokens_per_block // page_size)
    block_kv = pages * page_size
    rows = group * sizes.block_q
    kv_buffers = 2 * 2 * block_kv * head_dim * isz  # K and V, two slots
    q_out = 2 * 2 * rows * head_dim * isz  # q and out blocks, double-buffered by Pallas
    f32 = 4 * (3 * rows * block_kv + rows * head_dim + 2 * rows)  # s, p, mask; acc; m, l
    return kv_buffers + q_out + f32
