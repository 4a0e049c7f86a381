"""Ragged paged attention benchmark on one GPU (docs/benchmarks.md says how figures are measured).

In one run: our Pallas GPU kernel, JAX's Pallas GPU paged_attention (decode only; its own
arguments), the XLA reference, cuDNN dense attention on contiguous [B, ctx, H, D] K/V, and the
card's streaming limit (``paged_jax.runtime.bandwidth``: best of a 4 GiB copy and a 4 GiB read,
dispatch overlapped) as the bandwidth yardstick, "x limit". Page tables are a
random permutation (no page reused). Each timing is the median of >= 30 synchronised samples
after warm-up; a sample runs the call `inner` times back to back and blocks once, so Python
dispatch overlaps the device work. Each timed call runs the attention `--chain` times (16)
inside one executable, each call's q the previous call's output, as an engine step runs it once
per layer: standalone jitted calls (`--chain 1`) are bound by the host's dispatch at small
shapes (8 x 4096: ~55-70 us a call on an H200 against ~45 us of kernels). The implementations
of a case are sampled in turn (round r times each once), so drift in the card's clocks lands on
all of them alike. Prints one JSON line per (case, impl); writes results.json and results.md to
--out.

Effective bandwidth = K+V bytes the case must read / time; "x limit" = that / the streaming
limit of this run. A 1 GiB copy is still sampled in each case's rounds ("x copy", the yardstick
of figures before 2026-12: it understates an H200 by 1.4-1.6x), to show drift between cases.
Prefill cases also report attention TFLOP/s; their cuDNN baseline is non-causal attention of
the chunk over the whole context (it cannot place a causal diagonal at the chunk's offset),
which does 4-12% more work than the causal chunk here. The same goes for JAX's dense Pallas
Triton flash attention (`ops.gpu.attention.mha`, K/V repeated to every q head): the ceiling of
the Triton backend on this card, not a paged kernel.

Variants: `--variant decode:decode_stages=3,decode_kv_tokens=64` times our kernel with those
GpuBlockSizes fields on the decode cases (`prefill:` on prefill cases, `all:` on both);
`--prev FILE` also times another version of gpu.py (e.g. the last commit's) as `prev`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax.kernels import gpu, reference  # noqa: E402
from paged_jax.runtime.bandwidth import streaming_limit  # noqa: E402

DECODE = [(8, 4096), (32, 4096), (64, 2048), (128, 1024), (256, 512), (256, 2048)]
PREFILL = [(8, 256, 2048), (8, 512, 2048)]  # (batch, q_len, ctx)
HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = jnp.bfloat16


def _inner(fn, args, target_s: float = 20e-3) -> int:
    """Back-to-back calls per sample (fn compiled and warm), so a sample lasts ~target_s.

    20 ms, as long as the streaming limit's ten 4 GiB calls: with 2 ms samples (before
    2026-12-02) the sync and refill at each sample's ends cost a 1 GiB copy 14% on an H200.

    From the fastest of 5 single calls: one slow call would leave few calls per sample, and
    then each sample pays the dispatch latency that back-to-back calls hide."""
    once = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once.append(time.perf_counter() - t0)
    return max(1, min(500, int(target_s / max(min(once), 1e-6))))


def _sample(fn, args, inner: int) -> float:
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / inner


def time_fn(fn, args, *, reps: int) -> float:
    """Median seconds per call over `reps` synchronised samples."""
    return time_interleaved({"fn": (fn, args)}, reps=reps)["fn"]


def time_interleaved(fns: dict, *, reps: int) -> dict[str, float]:
    """Median seconds per call of each (fn, args), sampled in turn: round r times every fn
    once, so clock or thermal drift during the run lands on all of them alike."""
    inner = {}
    for name, (fn, args) in fns.items():
        for _ in range(3):
            jax.block_until_ready(fn(*args))
        inner[name] = _inner(fn, args)
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, (fn, args) in fns.items():
            samples[name].append(_sample(fn, args, inner[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def chained(fn, n: int):
    """`fn` run n times inside one executable, each call's q the last call's output (so no
    call can be hoisted or overlapped), as a step runs attention once per layer."""

    def run(q, *rest):
        return jax.lax.fori_loop(
            0, n, lambda _, x: fn(x, *rest).reshape(q.shape).astype(q.dtype), q
        )

    return jax.jit(run)


def copy_call() -> tuple:
    """(fn, args) of the 1 GiB device copy (bytes read + written = 2 GiB per call)."""
    x = jnp.arange(1 << 28, dtype=jnp.uint32)  # 1 GiB
    return jax.jit(lambda a: a ^ jnp.uint32(1)), (x,)


def copy_bandwidth(copy: tuple, reps: int) -> float:
    fn, args = copy
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2.0:  # an idle card takes a moment to reach its clocks
        jax.block_until_ready(fn(*args))
    return 2 * args[0].nbytes / time_fn(fn, args, reps=reps)


def paged_inputs(rng, batch: int, q_len: int, ctx: int):
    pages_per_seq = ctx // PAGE
    num_pages = batch * pages_per_seq + 1  # page 0 = NULL_PAGE
    key = jax.random.key(int(rng.integers(1 << 30)))
    kk, kv, kq = jax.random.split(key, 3)
    k_pages = jax.random.normal(kk, (HKV, num_pages, PAGE, D), DTYPE)
    v_pages = jax.random.normal(kv, (HKV, num_pages, PAGE, D), DTYPE)
    q = jax.random.normal(kq, (batch * q_len, HQ, D), DTYPE)
    tables = rng.permutation(np.arange(1, num_pages)).reshape(batch, pages_per_seq)
    kv_lens = np.full(batch, ctx, np.int32)
    cu = np.arange(batch + 1, dtype=np.int32) * q_len
    meta = tuple(jnp.asarray(a, jnp.int32) for a in (kv_lens, tables, cu, [batch]))
    return q, k_pages, v_pages, *meta


def dense_from_pages(k_pages, tables, batch: int, ctx: int):
    """Contiguous [B, ctx, Hkv, D] copy of the paged cache (for cuDNN)."""
    k = k_pages[:, tables]  # [Hkv, B, pages, PAGE, D]
    return k.reshape(HKV, batch, ctx, D).transpose(1, 2, 0, 3)


# --sweep: the variants that decided the defaults (docs/kernels.md).
SWEEP = [
    "decode:decode_stages=3",
    "decode:decode_kv_tokens=64,decode_stages=3",
    "decode:prefetch_pages=False",
    "prefill:prefill_stages=2",
    "prefill:prefill_stages=4",
    "prefill:prefill_kv_tokens=32,prefill_stages=4",
    "prefill:prefill_warps=8",
    "prefill:prefill_rows=128,prefill_warps=8",
    "prefill:prefill_rows=128,prefill_warps=8,prefill_stages=2",
    "prefill:prefill_rows=128,prefill_warps=8,prefill_kv_tokens=32,prefill_stages=4",
    "prefill:split_masks=False",
    "prefill:prefetch_pages=False",
]


def parse_variant(text: str) -> tuple[str, gpu.GpuBlockSizes]:
    """'decode:k=v,k=v' -> (case kind or 'all', GpuBlockSizes with those fields)."""
    kind, _, fields = text.partition(":")
    if kind not in ("decode", "prefill", "all"):
        raise ValueError(f"{text=} must start with decode:, prefill: or all:")
    types = {f.name: f.type for f in dataclasses.fields(gpu.GpuBlockSizes)}
    kw = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise ValueError(f"{key=} is not a GpuBlockSizes field")
        kw[key] = value == "True" if types[key] in (bool, "bool") else int(value)
    return kind, gpu.GpuBlockSizes(**kw)


def load_prev(path: Path):
    spec = importlib.util.spec_from_file_location("gpu_prev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_prev"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_case(
    kind: str, batch: int, q_len: int, ctx: int, copy: tuple, limit_bw: float, reps: int, rng,
    variants: list[str], prev, chain: int,
):  # fmt: skip
    q, k_pages, v_pages, kv_lens, tables, cu, num_seqs = paged_inputs(rng, batch, q_len, ctx)
    sm_scale = 1.0 / math.sqrt(D)
    kv_bytes = 2 * batch * ctx * HKV * D * jnp.dtype(DTYPE).itemsize
    causal_keys = sum(ctx - q_len + i + 1 for i in range(q_len)) * batch
    flops = 4 * causal_keys * HQ * D
    args = (q, k_pages, v_pages, kv_lens, tables, cu, num_seqs)
    # Decode cases call the kernel as the engine's decode-only steps do (decode_only=True).
    ours = functools.partial(gpu.ragged_paged_attention, sm_scale=sm_scale,
                             decode_only=kind == "decode")  # fmt: skip
    impls = {
        "ours": jax.jit(ours),
        "xla_reference": jax.jit(
            lambda *a: reference.ragged_paged_attention(*a, sm_scale=sm_scale)
        ),
    }
    impl_args = {"ours": args, "xla_reference": args}
    if variants:  # the same version timed twice: the spread is the noise floor
        impls["ours_again"] = impls["ours"]
        impl_args["ours_again"] = args
    if prev is not None:
        impls["prev"] = jax.jit(lambda *a: prev.ragged_paged_attention(*a, sm_scale=sm_scale))
        impl_args["prev"] = args
    for text in variants:
        variant_kind, cfg = parse_variant(text)
        if variant_kind in (kind, "all"):
            name = f"ours[{text.partition(':')[2]}]"
            impls[name] = jax.jit(functools.partial(ours, block_sizes=cfg))
            impl_args[name] = args
    if kind == "decode":
        try:
            from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa

            impls["jax_pallas_paged"] = jax.jit(
                lambda q_, k_, v_, t_, l_: jax_pa.paged_attention(q_ * sm_scale, k_, v_, t_, l_)
            )
            impl_args["jax_pallas_paged"] = (q, k_pages, v_pages, tables, kv_lens)
        except ImportError as e:
            print(f"# jax pallas paged_attention unavailable: {e}", file=sys.stderr)
    k_dense = dense_from_pages(k_pages, tables, batch, ctx)
    v_dense = dense_from_pages(v_pages, tables, batch, ctx)
    q_dense = q.reshape(batch, q_len, HQ, D)
    impls["cudnn_dense"] = jax.jit(
        lambda q_, k_, v_: jax.nn.dot_product_attention(
            q_, k_, v_, scale=sm_scale, implementation="cudnn"
        )
    )
    impl_args["cudnn_dense"] = (q_dense, k_dense, v_dense)
    if kind == "prefill":
        try:
            from jax.experimental.pallas.ops.gpu import attention as jax_mha

            k_rep = jnp.repeat(k_dense, HQ // HKV, axis=2)  # [B, ctx, Hq, D]
            v_rep = jnp.repeat(v_dense, HQ // HKV, axis=2)
            for bq, bk, stages in ((128, 128, 2), (128, 64, 3)):
                sizes = jax_mha.BlockSizes(block_q=bq, block_k=bk)
                name = f"jax_pallas_mha[{bq}x{bk},s{stages}]"
                impls[name] = jax.jit(
                    functools.partial(
                        jax_mha.mha, segment_ids=None, sm_scale=sm_scale,
                        block_sizes=sizes, num_stages=stages,
                    )
                )  # fmt: skip
                impl_args[name] = (q_dense, k_rep, v_rep)
        except ImportError as e:
            print(f"# jax pallas mha unavailable: {e}", file=sys.stderr)

    ref_out = None
    rows, errors, timed = [], {}, {}
    for name, fn in impls.items():  # compile and check each; a failing peer must not stop the run
        try:
            out = jax.block_until_ready(fn(*impl_args[name]))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(case=kind, impl=name, error=f"{type(e).__name__}: {e}"[:300]))
            print(json.dumps(rows[-1]), flush=True)
            continue
        if name.startswith(("ours", "prev")) or name == "xla_reference":
            flat = np.asarray(out.astype(jnp.float32))
            if ref_out is None:
                ref_out = flat
            else:
                errors[name] = float(np.linalg.norm(flat - ref_out) / np.linalg.norm(ref_out))
        timed[name] = (fn, impl_args[name])
    timed = {name: (chained(fn, chain), a) for name, (fn, a) in timed.items()}
    slow = {n: timed.pop(n) for n in list(timed) if n == "xla_reference"}  # not interleaved
    # The copy is sampled in the same rounds: ratios to it hold even if the card's state drifts.
    timed["copy_1gib"] = copy
    times = time_interleaved(timed, reps=reps) | time_interleaved(slow, reps=3)
    case_copy_bw = 2 * copy[1][0].nbytes / times.pop("copy_1gib")
    times = {name: t / chain for name, t in times.items()}  # seconds per attention call
    print(json.dumps(dict(case=kind, impl="copy", tbps=round(case_copy_bw / 1e12, 3))), flush=True)
    for name, t in times.items():
        row = dict(
            case=kind, batch=batch, q_len=q_len, ctx=ctx, impl=name, us=round(t * 1e6, 1),
            tbps=round(kv_bytes / t / 1e12, 3), ratio_limit=round(kv_bytes / t / limit_bw, 3),
            ratio_copy=round(kv_bytes / t / case_copy_bw, 3),
            tflops=round(flops / t / 1e12, 1), copy_tbps=round(case_copy_bw / 1e12, 3),
        )  # fmt: skip
        if name in errors:
            row["rel_err_vs_ours"] = errors[name]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], copy_bw: float, limit: dict, chain: int) -> str:
    lines = [
        f"streaming limit: {limit['bytes_per_s'] / 1e12:.2f} TB/s ({limit['method']}); "
        f"1 GiB host-timed copy: {copy_bw / 1e12:.2f} TB/s; attention calls per executable: "
        f"{chain}",
        "",
        "| case | B | q_len | ctx | impl | us | TB/s | x limit | x copy (copy TB/s) | TFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | | | {r['impl']} | error | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['q_len']} | {r['ctx']} | {r['impl']} | "
            f"{r['us']} | {r['tbps']} | {r['ratio_limit']} | {r['ratio_copy']} "
            f"({r['copy_tbps']}) | {r['tflops']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--only", choices=["decode", "prefill"], default=None)
    parser.add_argument("--sweep", action="store_true", help="also time the SWEEP variants")
    parser.add_argument("--variant", action="append", default=[], help="kind:field=value,...")
    parser.add_argument("--prev", type=Path, default=None, help="another gpu.py to time")
    parser.add_argument(
        "--chain", type=int, default=16,
        help="attention calls per executable (1: standalone jitted calls, host-dispatch bound "
        "at small shapes)",
    )  # fmt: skip
    args = parser.parse_args()
    variants = (SWEEP if args.sweep else []) + args.variant
    for text in variants:
        parse_variant(text)  # fail before any device work
    prev = load_prev(args.prev) if args.prev else None
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    print(f"# {jax.devices()[0].device_kind} jax {jax.__version__}", flush=True)
    copy = copy_call()
    copy_bw = copy_bandwidth(copy, args.reps)
    limit = streaming_limit()
    limit_bw = limit["bytes_per_s"]
    print(json.dumps(dict(case="copy", tbps=round(copy_bw / 1e12, 3))), flush=True)
    print(json.dumps(dict(case="streaming_limit", **limit)), flush=True)
    cases = []
    if args.only in (None, "decode"):
        cases += [("decode", batch, 1, ctx) for batch, ctx in DECODE]
    if args.only in (None, "prefill"):
        cases += [("prefill", *shape) for shape in PREFILL]
    rows = []
    for kind, batch, q_len, ctx in cases:
        rows += run_case(
            kind, batch, q_len, ctx, copy, limit_bw, args.reps, rng, variants, prev, args.chain
        )
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                copy_tbps=copy_bw / 1e12, streaming_limit=limit, chain=args.chain)  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (args.out / "results.md").write_text(markdown(rows, copy_bw, limit, args.chain))
    print(markdown(rows, copy_bw, limit, args.chain))


if __name__ == "__main__":
    main()
