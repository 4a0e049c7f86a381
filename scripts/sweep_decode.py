"""Decode-kernel tile sweep: our GPU kernel's GpuBlockSizes variants against its defaults.

    python scripts/sweep_decode.py --out DIR [--reps 20]

For each head shape (Hq, Hkv, D: the issue's 32/8/128, llama2-7b's 32/32/128, llama-1b's
32/8/64) and decode shape (B x ctx), times the default tiles, the defaults again (the noise
floor), every variant of VARIANTS that applies to the shape (the ``small_batch_*`` knobs only
where B * Hkv <= small_batch_programs, the ``decode_*`` knobs only above), and cuDNN on
contiguous K/V, sampled in turn (``bench_kernel.time_interleaved``), each timed call
chaining ``--chain`` calls in one executable (``bench_kernel.chained``). "x limit" divides the K/V
bytes read per second by the card's streaming limit of this run. Writes sweep.json/sweep.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_kernel as bk  # noqa: E402

from paged_jax.kernels import gpu  # noqa: E402
from paged_jax.runtime.bandwidth import streaming_limit  # noqa: E402

SHAPES = {
    (32, 8, 128): [(8, 4096), (32, 4096), (64, 2048), (128, 1024), (256, 512), (256, 2048)],
    (32, 32, 128): [(8, 2048), (64, 1024), (192, 512)],
    (32, 8, 64): [(8, 4096), (64, 2048), (256, 512)],
}
VARIANTS = [
    "decode_stages=3",
    "decode_kv_tokens=64,decode_stages=2",
    "decode_kv_tokens=64,decode_stages=3",
    "decode_kv_tokens=64,decode_stages=4",
    "decode_kv_tokens=32,decode_stages=4",
    "decode_warps=8",
    "decode_kv_tokens=64,decode_stages=3,decode_warps=8",
    "decode_warps=2,decode_kv_tokens=64,decode_stages=3",
    "target_programs=512",
    "target_programs=1024",
    "small_batch_target=256",
    "small_batch_target=1024,max_splits=32",
    "small_batch_kv_tokens=128,small_batch_stages=2,small_batch_warps=4",
    "small_batch_kv_tokens=32,small_batch_stages=4",
    "small_batch_kv_tokens=64,small_batch_stages=4,small_batch_warps=4",
    "small_batch_kv_tokens=128,small_batch_stages=3,small_batch_warps=8",
]


def applies(text: str, batch: int, hkv: int) -> bool:
    small = batch * hkv <= gpu.DEFAULT_BLOCK_SIZES.small_batch_programs
    return text.startswith("small_batch") == small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variant", action="append", default=None, help="replace VARIANTS")
    ap.add_argument("--chain", type=int, default=16, help="calls per executable (bench_kernel)")
    args = ap.parse_args()
    variants = args.variant or VARIANTS
    args.out.mkdir(parents=True, exist_ok=True)
    limit = streaming_limit()
    limit_bw = limit["bytes_per_s"]
    print(f"# {jax.devices()[0].device_kind} jax {jax.__version__} limit "
          f"{limit_bw / 1e12:.3f} TB/s", flush=True)  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    for (hq, hkv, d), cases in SHAPES.items():
        bk.HQ, bk.HKV, bk.D = hq, hkv, d
        for batch, ctx in cases:
            q, k_pages, v_pages, kv_lens, tables, cu, num_seqs = bk.paged_inputs(rng, batch, 1, ctx)
            args_ = (q, k_pages, v_pages, kv_lens, tables, cu, num_seqs)
            sm = 1.0 / math.sqrt(d)
            rpa = functools.partial(gpu.ragged_paged_attention, sm_scale=sm, decode_only=True)
            impls = {"default": jax.jit(rpa), "default_again": jax.jit(rpa)}
            # the general call (a chunk launch after the decode grid): what steps paid before
            impls["general"] = jax.jit(functools.partial(gpu.ragged_paged_attention, sm_scale=sm))
            for text in variants:
                if applies(text, batch, hkv):
                    _, sizes = bk.parse_variant("decode:" + text)
                    impls[text] = jax.jit(functools.partial(rpa, block_sizes=sizes))
            timed = {n: (f, args_) for n, f in impls.items()}
            ref = np.asarray(impls["default"](*args_).astype(jnp.float32))
            for name, (fn, a) in list(timed.items()):
                try:
                    out = np.asarray(fn(*a).astype(jnp.float32))
                    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                    if not err < 1e-2:
                        raise ValueError(f"rel err {err}")
                except Exception as e:  # noqa: BLE001 - one bad variant must not stop the sweep
                    print(json.dumps(dict(case=[hq, hkv, d, batch, ctx], impl=name,
                                          error=str(e)[:200])), flush=True)  # fmt: skip
                    timed.pop(name)
            k_dense = bk.dense_from_pages(k_pages, tables, batch, ctx)
            v_dense = bk.dense_from_pages(v_pages, tables, batch, ctx)
            timed["cudnn_dense"] = (
                jax.jit(
                    functools.partial(
                        jax.nn.dot_product_attention, scale=sm, implementation="cudnn"
                    )
                ),
                (q.reshape(batch, 1, hq, d), k_dense, v_dense),
            )
            timed = {n: (bk.chained(f, args.chain), a) for n, (f, a) in timed.items()}
            times = bk.time_interleaved(timed, reps=args.reps)
            times = {n: t / args.chain for n, t in times.items()}  # seconds per call
            kv_bytes = 2 * batch * ctx * hkv * d * 2
            for name, t in sorted(times.items(), key=lambda kv: kv[1]):
                x_limit = round(kv_bytes / t / limit_bw, 3)
                row = dict(hq=hq, hkv=hkv, d=d, batch=batch, ctx=ctx, impl=name,
                           us=round(t * 1e6, 1), x_limit=x_limit)  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            del k_pages, v_pages, k_dense, v_dense
    (args.out / "sweep.json").write_text(json.dumps(dict(limit=limit, rows=rows), indent=1))
    lines = ["| Hq/Hkv/D | B x ctx | best | us | x limit | default us | x limit | cuDNN us |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    cases = {}
    for r in rows:
        cases.setdefault((r["hq"], r["hkv"], r["d"], r["batch"], r["ctx"]), []).append(r)
    for (hq, hkv, d, b, c), rs in cases.items():
        by = {r["impl"]: r for r in rs}
        ours = [r for r in rs if r["impl"] != "cudnn_dense"]
        best = min(ours, key=lambda r: r["us"])
        df, cu = by["default"], by.get("cudnn_dense", {"us": float("nan")})
        lines.append(
            f"| {hq}/{hkv}/{d} | {b} x {c} | {best['impl']} | {best['us']} | "
            f"{best['x_limit']} | {df['us']} | {df['x_limit']} | {cu['us']} |"
        )
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
