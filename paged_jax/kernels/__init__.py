"""Ragged paged attention: one contract (docs/kernels.md), three backends, chosen here.

`ragged_paged_attention(..., impl="auto")` picks by `jax.default_backend()`: the Pallas Mosaic
TPU kernel on TPU, the Pallas GPU kernel on GPU, the plain-jnp reference elsewhere (CPU).
`write_kv` is the same scatter on every backend (XLA updates donated pages in place).
Backends are imported on first use, so importing this package never pulls in Pallas.
"""

from __future__ import annotations

import importlib

import jax

from paged_jax.kernels.reference import write_kv

IMPLS = ("auto", "reference", "tpu", "gpu")
_AUTO = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}

__all__ = ["IMPLS", "ragged_paged_attention", "resolve_impl", "write_kv"]


def resolve_impl(impl: str = "auto") -> str:
    """The backend `impl` stands for on this process's default device."""
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    if impl == "auto":
        return _AUTO.get(jax.default_backend(), "reference")
    return impl


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
    impl: str = "auto",
    decode_only: bool = False,
) -> jax.Array:
    """Attention of packed q rows over their sequences' KV pages; [T, Hq, D] in q.dtype.

    q [T, Hq, D]; k_pages/v_pages [Hkv, P, page_size, D]; kv_lens i32[S];
    page_tables i32[S, max_pages_per_seq]; cu_q_lens i32[S+1]; num_seqs i32[1].
    Rows past cu_q_lens[num_seqs] are padding and come back as 0.
    ``decode_only`` is the caller's promise that every live sequence has q_len 1 and T == S;
    the result is the same, and the GPU kernel uses it to skip its chunk launch.
    """
    name = resolve_impl(impl)
    module = importlib.import_module(f"paged_jax.kernels.{name}")
    extra = {"decode_only": decode_only} if name == "gpu" else {}
    return module.ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, page_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, **extra,
    )  # fmt: skip
