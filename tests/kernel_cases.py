"""Random ragged-paged-attention cases and a float64 numpy oracle, shared by all kernel tests.

A case is built from a `CaseSpec` (sizes, lengths, seed). Every page that no live sequence
owns (page 0, free pages, pages of padding sequences) and every slot past a sequence's length
in its last page holds NaN, so a stray read, or a masked weight times a garbage value, makes
the output non-finite and fails the test. Page tables are a random permutation of pages.
Padding sequences (s >= num_seqs) get garbage kv_lens and page tables that point at NaN pages.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    max_rel_norm: float  # bound on ||out - ref|| / ||ref||


# Against the float64 oracle. bf16 outputs are rounded to bf16 (2^-9 relative) and kernels may
# feed probabilities to the PV matmul in bf16; f32 kernels must not use tf32.
TOLERANCES = {
    "float32": Tolerance(atol=1e-4, rtol=1e-4, max_rel_norm=1e-5),
    "bfloat16": Tolerance(atol=2e-2, rtol=2e-2, max_rel_norm=8e-3),
}


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    page_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "bfloat16"
    kv_lens: tuple[int, ...]  # live sequences
    q_lens: tuple[int, ...]  # each <= its kv_len
    pages_per_seq: int  # max_pages_per_seq (columns of the page table)
    num_padding_seqs: int = 2
    num_padding_rows: int = 3
    num_free_pages: int = 5  # pages nobody owns (NaN), besides NULL_PAGE
    sliding_window: int | None = None
    soft_cap: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        assert len(self.kv_lens) == len(self.q_lens)
        for kv_len, q_len in zip(self.kv_lens, self.q_lens, strict=True):
            assert 1 <= q_len <= kv_len <= self.pages_per_seq * self.page_size, self


@dataclasses.dataclass(frozen=True)
class Case:
    spec: CaseSpec
    q: np.ndarray  # [T, Hq, D] spec.dtype
    k_pages: np.ndarray  # [Hkv, P, page_size, D]
    v_pages: np.ndarray  # [Hkv, P, page_size, D]
    kv_lens: np.ndarray  # i32[S]
    page_tables: np.ndarray  # i32[S, pages_per_seq]
    cu_q_lens: np.ndarray  # i32[S+1]
    num_seqs: np.ndarray  # i32[1]
    sm_scale: float

    def args(self) -> tuple[jnp.ndarray, ...]:
        """Positional arguments of ragged_paged_attention, as device arrays."""
        return tuple(
            jnp.asarray(a)
            for a in (
                self.q, self.k_pages, self.v_pages, self.kv_lens,
                self.page_tables, self.cu_q_lens, self.num_seqs,
            )
        )  # fmt: skip

    def kwargs(self) -> dict:
        return dict(
            sm_scale=self.sm_scale,
            sliding_window=self.spec.sliding_window,
            soft_cap=self.spec.soft_cap,
        )


def make_case(spec: CaseSpec) -> Case:
    rng = np.random.default_rng(spec.seed)
    dtype = jnp.dtype(spec.dtype)
    ps, hkv, d = spec.page_size, spec.num_kv_heads, spec.head_dim
    num_live = len(spec.kv_lens)
    max_num_seqs = num_live + spec.num_padding_seqs
    pages_needed = [math.ceil(n / ps) for n in spec.kv_lens]
    num_pages = 1 + sum(pages_needed) + spec.num_free_pages
    owned = rng.permutation(np.arange(1, num_pages))[: sum(pages_needed)]

    k_pages = np.full((hkv, num_pages, ps, d), np.nan, np.float32)
    v_pages = np.full((hkv, num_pages, ps, d), np.nan, np.float32)
    page_tables = np.zeros((max_num_seqs, spec.pages_per_seq), np.int32)
    start = 0
    for s, (kv_len, n_pages) in enumerate(zip(spec.kv_lens, pages_needed, strict=True)):
        pages = owned[start : start + n_pages]
        start += n_pages
        page_tables[s, :n_pages] = pages
        for i, page in enumerate(pages):
            filled = min(ps, kv_len - i * ps)  # later slots of the last page stay NaN
            k_pages[:, page, :filled] = rng.standard_normal((hkv, filled, d))
            v_pages[:, page, :filled] = rng.standard_normal((hkv, filled, d))
    # Padding sequences: garbage lengths and tables pointing anywhere (NaN pages included).
    page_tables[num_live:] = rng.integers(0, num_pages, (spec.num_padding_seqs, spec.pages_per_seq))
    kv_lens = np.zeros(max_num_seqs, np.int32)
    kv_lens[:num_live] = spec.kv_lens
    kv_lens[num_live:] = rng.integers(1, spec.pages_per_seq * ps + 1, spec.num_padding_seqs)
    cu_q_lens = np.zeros(max_num_seqs + 1, np.int32)
    cu_q_lens[1 : num_live + 1] = np.cumsum(spec.q_lens)
    cu_q_lens[num_live + 1 :] = cu_q_lens[num_live]
    num_tokens = int(cu_q_lens[num_live]) + spec.num_padding_rows
    q = rng.standard_normal((num_tokens, spec.num_q_heads, d)).astype(np.float32)
    return Case(
        spec=spec,
        q=q.astype(dtype),
        k_pages=k_pages.astype(dtype),
        v_pages=v_pages.astype(dtype),
        kv_lens=kv_lens,
        page_tables=page_tables,
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([num_live], np.int32),
        sm_scale=1.0 / math.sqrt(d),
    )


def oracle(case: Case) -> np.ndarray:
    """Naive per-sequence dense attention in float64; padding rows are 0. f64[T, Hq, D]."""
    spec = case.spec
    q = case.q.astype(np.float64)  # f64[T, Hq, D]
    k_pages = case.k_pages.astype(np.float64)
    v_pages = case.v_pages.astype(np.float64)
    group = spec.num_q_heads // spec.num_kv_heads
    out = np.zeros(q.shape, np.float64)
    for s in range(int(case.num_seqs[0])):
        kv_len = int(case.kv_lens[s])
        n_pages = math.ceil(kv_len / spec.page_size)
        pages = case.page_tables[s, :n_pages]
        k = k_pages[:, pages].reshape(spec.num_kv_heads, -1, spec.head_dim)[:, :kv_len]
        v = v_pages[:, pages].reshape(spec.num_kv_heads, -1, spec.head_dim)[:, :kv_len]
        k = np.repeat(k, group, axis=0)  # f64[Hq, kv_len, D]
        v = np.repeat(v, group, axis=0)
        row0, row1 = int(case.cu_q_lens[s]), int(case.cu_q_lens[s + 1])
        for i, row in enumerate(range(row0, row1)):
            pos = kv_len - (row1 - row0) + i
            lo = 0 if spec.sliding_window is None else max(0, pos - spec.sliding_window + 1)
            logits = np.einsum("hd,hkd->hk", q[row], k[:, lo : pos + 1]) * case.sm_scale
            if spec.soft_cap is not None:
                logits = spec.soft_cap * np.tanh(logits / spec.soft_cap)
            w = np.exp(logits - logits.max(axis=-1, keepdims=True))
            w /= w.sum(axis=-1, keepdims=True)
            out[row] = np.einsum("hk,hkd->hd", w, v[:, lo : pos + 1])
    return out


def assert_close(out: np.ndarray, expected: np.ndarray, dtype: str, *, scale: float = 1.0) -> None:
    """Finite everywhere, elementwise within TOLERANCES[dtype] (times scale), and in norm."""
    tol = TOLERANCES[dtype]
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all(), f"{np.argwhere(~np.isfinite(out))[:5]} non-finite"
    np.testing.assert_allclose(out, expected, atol=tol.atol * scale, rtol=tol.rtol * scale)
    rel = np.linalg.norm(out - expected) / max(np.linalg.norm(expected), 1e-30)
    assert rel <= tol.max_rel_norm * scale, f"{rel=}"


def boundary_lens(page_size: int, pages_per_seq: int) -> tuple[int, ...]:
    """kv lengths at page edges: 1, page_size-1, page_size, page_size+1, and the maximum."""
    lens = (1, page_size - 1, page_size, page_size + 1, pages_per_seq * page_size)
    return tuple(n for n in lens if n >= 1)


def mixed_spec(
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    *,
    pages_per_seq: int = 4,
    seed: int = 0,
    **extra,
) -> CaseSpec:
    """Boundary kv lengths, each sequence either a decode row (q_len 1) or a prefill chunk."""
    rng = np.random.default_rng(seed + 1000)
    kv_lens = list(boundary_lens(page_size, pages_per_seq))
    kv_lens += list(rng.integers(1, pages_per_seq * page_size + 1, 2))
    q_lens = []
    for i, n in enumerate(kv_lens):
        if i % 2 == 0 or n == 1:
            q_lens.append(1)  # decode row
        else:
            q_lens.append(int(rng.integers(1, n + 1)))  # chunk; sometimes the whole prompt
    q_lens[-1] = kv_lens[-1]  # one full prefill
    return CaseSpec(
        page_size, num_q_heads, num_kv_heads, head_dim, dtype,
        kv_lens=tuple(int(n) for n in kv_lens), q_lens=tuple(q_lens),
        pages_per_seq=pages_per_seq, seed=seed, **extra,
    )  # fmt: skip


def decode_spec(
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    *,
    num_seqs: int = 6,
    pages_per_seq: int = 4,
    seed: int = 0,
    **extra,
) -> CaseSpec:
    """A decode-only batch (every q_len 1): the hot path."""
    rng = np.random.default_rng(seed + 2000)
    kv_lens = list(boundary_lens(page_size, pages_per_seq))
    kv_lens += list(rng.integers(1, pages_per_seq * page_size + 1, max(0, num_seqs - 5)))
    kv_lens = kv_lens[:num_seqs]
    return CaseSpec(
        page_size, num_q_heads, num_kv_heads, head_dim, dtype,
        kv_lens=tuple(int(n) for n in kv_lens), q_lens=(1,) * len(kv_lens),
        pages_per_seq=pages_per_seq, seed=seed, **extra,
    )  # fmt: skip


def sweep_specs(
    page_sizes: tuple[int, ...] = (8, 16),
    gqa: tuple[tuple[int, int], ...] = ((4, 4), (8, 2), (6, 1)),
    head_dims: tuple[int, ...] = (64, 128),
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    pages_per_seq: int = 4,
    cross_dtypes: bool = True,
) -> list[CaseSpec]:
    """The contract's sweep: every combination, alternating mixed and decode-only batches.

    ``cross_dtypes=False``: each (page size, GQA, head dim) once, the dtypes taken in turn
    (half the cases; every dtype still meets both batch kinds and every other value)."""
    combos = [(ps, g, d) for ps in page_sizes for g in gqa for d in head_dims]
    if cross_dtypes:
        combos = [(*c, t) for c in combos for t in dtypes]
    else:
        combos = [(*c, dtypes[i % len(dtypes)]) for i, c in enumerate(combos)]
    specs = []
    for i, (ps, (hq, hkv), d, dtype) in enumerate(combos):
        make = mixed_spec if (i + i // 2) % 2 == 0 else decode_spec  # both kinds per dtype
        specs.append(make(ps, hq, hkv, d, dtype, pages_per_seq=pages_per_seq, seed=i))
    return specs


def spec_id(spec: CaseSpec) -> str:
    kind = "decode" if all(n == 1 for n in spec.q_lens) else "mixed"
    extra = ""
    if spec.sliding_window is not None:
        extra += f"-win{spec.sliding_window}"
    if spec.soft_cap is not None:
        extra += f"-cap{spec.soft_cap:g}"
    return (
        f"{kind}-ps{spec.page_size}-h{spec.num_q_heads}x{spec.num_kv_heads}"
        f"-d{spec.head_dim}-{spec.dtype}{extra}"
    )
