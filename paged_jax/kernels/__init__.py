"""Ragged paged attention: one contract (docs/kernels.md), three backends, chosen here.

`ragged_paged_attention(..., impl="auto")` picks by `jax.default_backend()`: the Pallas Mosaic
TPU kernel on TPU, the Pallas GPU kernel on GPU, the plain-jnp reference elsewhere (CPU).
`write_kv` is the same scatter on every backend (XLA updates donated pages in place).
Backends are imported on first use, so importing this package never pulls in Pallas.
`resolve_page_size` gives the engine's default KV page size per platform and TPU generation.
"""

from __future__ import annotations

import importlib

import jax

from paged_jax.kernels.reference import write_kv

IMPLS = ("auto", "reference", "tpu", "gpu")
_RESOLVED = ("reference", "tpu", "gpu", "tpu_interpret")  # what resolve_impl returns
_AUTO = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}

DEFAULT_PAGE_SIZE = 16  # CPU, GPU, and a TPU generation the chip table does not know

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "IMPLS",
    "ragged_paged_attention",
    "resolve_impl",
    "resolve_page_size",
    "write_kv",
]


def resolve_page_size(
    page_size: int | None = None, platform: str | None = None, device_kind: str = ""
) -> int:
    """The KV page size the engine uses: ``page_size`` when set (a user's value always wins),
    else on TPU the chip table's for ``device_kind`` (``tpu_chips``: "TPU v6 lite", or a
    table name such as "v5e"), else DEFAULT_PAGE_SIZE. ``platform`` None: this process's
    default device (its platform and device kind)."""
    if page_size is not None:
        return page_size
    if platform is None:
        device = jax.devices()[0]
        platform, device_kind = device.platform, device.device_kind
    if platform != "tpu":
        return DEFAULT_PAGE_SIZE
    from paged_jax.kernels.tpu_chips import chip_of  # imports Pallas: only when on TPU

    chip = chip_of(device_kind)
    return DEFAULT_PAGE_SIZE if chip is None else chip.page_size


def resolve_impl(impl: str = "auto", platform: str | None = None) -> str:
    """The backend `impl` stands for on `platform` (default: this process's default device).

    "tpu" off a TPU is "tpu_interpret": the Mosaic kernel in the TPU interpreter (for checking
    on CPU, not for speed). A lowering for TPU made on CPU passes platform="tpu"."""
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        return _AUTO.get(platform, "reference")
    if impl == "tpu" and platform != "tpu":
        return "tpu_interpret"
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
    batch_invariant: bool = False,
) -> jax.Array:  # impl: one of IMPLS, or what resolve_impl returned
    """Attention of packed q rows over their sequences' KV pages; [T, Hq, D] in q.dtype.

    q [T, Hq, D]; k_pages/v_pages [Hkv, P, page_size, D]; kv_lens i32[S];
    page_tables i32[S, max_pages_per_seq]; cu_q_lens i32[S+1]; num_seqs i32[1].
    Rows past cu_q_lens[num_seqs] are padding and come back as 0.
    ``decode_only`` is the caller's promise that every live sequence has q_len 1 and T == S;
    the result is the same, and the GPU kernel uses it to skip its chunk launch.
    ``batch_invariant``: each row's result bit for bit independent of the other rows, the
    bucket and whether its sequence's rows arrive as a chunk or one by one (fixed tiles, no
    batch-dependent split, one kv-block order); reference and gpu only.
    """
    name = impl if impl in _RESOLVED else resolve_impl(impl)
    module = importlib.import_module(f"paged_jax.kernels.{name.removesuffix('_interpret')}")
    # batch-invariant rows take one path whatever the step (reference: no per-row shortcut)
    use_decode_only = name == "gpu" or (name == "reference" and not batch_invariant)
    extra = {"decode_only": decode_only} if use_decode_only else {}
    if batch_invariant:
        if name not in ("reference", "gpu"):
            raise ValueError(f"batch_invariant attention needs impl reference or gpu, not {name!r}")
        extra["block_sizes"] = module.INVARIANT_BLOCK_SIZES
    if name == "tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu

        extra["interpret"] = pltpu.InterpretParams()
    return module.ragged_paged_attention(
        q, k_pages, v_pages, kv_lens, page_tables, cu_q_lens, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, **extra,
    )  # fmt: skip
