"""Input checks shared by every ragged-paged-attention backend (the contract in docs/kernels.md).

All backends take the same arguments; this module owns the shape and dtype rules so that a
wrong call fails the same way whichever backend runs it. Checks are static (shapes, dtypes,
options): values inside the index arrays are the caller's promise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MASKED = -1e30  # running-max floor: finite, so exp(m_old - m_new) never sees inf - inf
LOG2E = 1.4426950408889634  # softmax in the log2 domain: exp2 is the native instruction


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Static sizes read off one call's arguments."""

    num_tokens: int  # T: packed q rows
    num_q_heads: int  # Hq
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    num_pages: int  # P, page 0 included (NULL_PAGE)
    page_size: int
    max_num_seqs: int  # S
    pages_per_seq: int  # max_pages_per_seq

    @property
    def group(self) -> int:
        """q heads per kv head."""
        return self.num_q_heads // self.num_kv_heads


def check_attention_args(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> AttentionShape:
    """Validate the contract's shapes, dtypes and options; return the static sizes."""
    if q.ndim != 3:
        raise ValueError(f"{q.shape=} must be [num_tokens, num_q_heads, head_dim]")
    if k_pages.ndim != 4:
        raise ValueError(f"{k_pages.shape=} must be [num_kv_heads, num_pages, page_size, head_dim]")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"{v_pages.shape=} must equal {k_pages.shape=}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"{v_pages.dtype=} must equal {k_pages.dtype=}")
    if not any(q.dtype == d for d in FLOAT_DTYPES):
        raise ValueError(f"{q.dtype=} must be one of float32, bfloat16, float16")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, k_head_dim = k_pages.shape
    if k_head_dim != head_dim:
        raise ValueError(f"{k_pages.shape=} must end in q's head_dim {head_dim}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} must be a multiple of {num_kv_heads=}")
    if page_size < 1:
        raise ValueError(f"{page_size=} must be >= 1")
    if kv_lens.ndim != 1:
        raise ValueError(f"{kv_lens.shape=} must be [max_num_seqs]")
    max_num_seqs = kv_lens.shape[0]
    if page_tables.ndim != 2 or page_tables.shape[0] != max_num_seqs:
        raise ValueError(f"{page_tables.shape=} must be [{max_num_seqs}, max_pages_per_seq]")
    if cu_q_lens.shape != (max_num_seqs + 1,):
        raise ValueError(f"{cu_q_lens.shape=} must be ({max_num_seqs + 1},)")
    if num_seqs.shape != (1,):
        raise ValueError(f"{num_seqs.shape=} must be (1,)")
    for name, arr in (
        ("kv_lens", kv_lens),
        ("page_tables", page_tables),
        ("cu_q_lens", cu_q_lens),
        ("num_seqs", num_seqs),
    ):
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name}.dtype={arr.dtype} must be int32")
    if not sm_scale > 0:
        raise ValueError(f"{sm_scale=} must be > 0")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"{sliding_window=} must be None or >= 1")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"{soft_cap=} must be None or > 0")
    return AttentionShape(
        num_tokens=num_tokens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        num_pages=num_pages,
        page_size=page_size,
        max_num_seqs=max_num_seqs,
        pages_per_seq=page_tables.shape[1],
    )


def check_write_args(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
) -> None:
    """Validate write_kv's shapes and dtypes."""
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(
            f"{k_pages.shape=} and {v_pages.shape=} must both be "
            "[num_kv_heads, num_pages, page_size, head_dim]"
        )
    num_kv_heads, _, _, head_dim = k_pages.shape
    if k_new.ndim != 3 or k_new.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"{k_new.shape=} must be [num_tokens, {num_kv_heads}, {head_dim}]")
    if v_new.shape != k_new.shape:
        raise ValueError(f"{v_new.shape=} must equal {k_new.shape=}")
    if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(
            f"{slot_mapping.shape=} {slot_mapping.dtype=} must be int32[{k_new.shape[0]}]"
        )
