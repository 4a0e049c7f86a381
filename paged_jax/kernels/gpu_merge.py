"""The decode grid's split merge as one small Triton launch (``kernels/gpu.py``).

With kv splits the decode programs write partial (acc, max, sum) per (split, sequence, head);
one program per (sequence, kv head) here combines its group's splits and stores the final rows
where the decode grid would have with one split: a live decode sequence's row at cu_q_lens[s],
and in a decode-only call a padding sequence's row (row s) as zeros. Done with jnp ops it took
several XLA launches and their gaps: at 8 sequences x 4096, a standalone call spent about as long
on them as in the decode kernel (docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _kernel(cu_q_lens_ref, num_seqs_ref, o_ref, m_ref, l_ref, *out_refs, group: int, rows: int,
            num_q_heads: int, num_tokens: int, zero_dead: bool, spare: bool):  # fmt: skip
    # o_ref: f32[splits, S, Hq + 1, D]; m_ref, l_ref: f32[splits, S, Hq + 1] (log2 domain)
    seq, h = pl.program_id(0), pl.program_id(1)
    num_splits, _, _, head_dim = o_ref.shape
    o_out = out_refs[-1]  # [R, D]; out_refs[0] is the aliased input when there are two
    g = lax.broadcasted_iota(jnp.int32, (rows,), 0)  # i32[M]: rows past the group are masked
    head = h * group + jnp.minimum(g, group - 1)  # i32[M]
    lanes = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)  # i32[1, D]

    ms = [plgpu.load(m_ref.at[s, seq, head]) for s in range(num_splits)]  # f32[M] each
    m_max = functools.reduce(jnp.maximum, ms)
    l = jnp.zeros((rows,), jnp.float32)
    acc = jnp.zeros((rows, head_dim), jnp.float32)
    for s in range(num_splits):
        w = jnp.exp2(ms[s] - m_max)  # f32[M]: empty splits have m at the floor, l = 0
        l += plgpu.load(l_ref.at[s, seq, head]) * w
        acc += plgpu.load(o_ref.at[s, seq, head[:, None], lanes]) * w[:, None]

    q_start = cu_q_lens_ref[seq]
    live = (seq < num_seqs_ref[0]) & (cu_q_lens_ref[seq + 1] - q_start == 1)
    out = jnp.where(live, acc / jnp.maximum(l, 1e-30)[:, None], 0.0)  # dead: partials unset
    first = jnp.where(live, q_start, seq)
    st_ok = (g < group) & (live | (zero_dead & (seq < num_tokens)))  # bool[M]
    st_row = jnp.clip(first, 0, num_tokens - 1) * num_q_heads + head
    if spare:  # the interpreter writes masked rows back: send them to distinct spare rows
        st_row = jnp.where(st_ok, st_row, num_tokens * num_q_heads + g)
    mask = jnp.broadcast_to(st_ok[:, None], (rows, head_dim))
    plgpu.store(o_out.at[st_row[:, None], lanes], out.astype(o_out.dtype), mask=mask)


def merge(
    cu_q_lens: jax.Array, num_seqs: jax.Array, o_part: jax.Array, m_part: jax.Array,
    l_part: jax.Array, out: jax.Array | jax.ShapeDtypeStruct, *, group: int, rows: int,
    num_q_heads: int, num_tokens: int, zero_dead: bool, interpret: bool,
) -> jax.Array:  # fmt: skip
    """Final decode rows written into `out` ([R, D], aliased), or into a fresh buffer when `out`
    is a ShapeDtypeStruct (rows the call does not own are left for the chunk launch). `rows`
    (a power of two >= the group, >= 16) rows per program; the interpreter needs that many
    spare rows past T * Hq."""
    fresh = isinstance(out, jax.ShapeDtypeStruct)
    _, max_num_seqs, _, _ = o_part.shape
    hkv = num_q_heads // group
    kernel = functools.partial(
        _kernel, group=group, rows=rows, num_q_heads=num_q_heads, num_tokens=num_tokens,
        zero_dead=zero_dead, spare=interpret,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(max_num_seqs, hkv),
        out_shape=out if fresh else jax.ShapeDtypeStruct(out.shape, out.dtype),
        input_output_aliases={} if fresh else {5: 0},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="rpa_merge",
    )(cu_q_lens, num_seqs, o_part, m_part, l_part, *(() if fresh else (out,)))
