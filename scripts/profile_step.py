"""Where a decode step's time goes: timed variants of the engine step and an XLA profile.

    python scripts/profile_step.py --model random:llama2-7b --batch 192 --ctx 512 --out DIR

Builds the engine's step (``runtime.step.make_step``) for a decode batch of ``--batch``
sequences at ``--ctx`` tokens each (random page permutation, random bf16 weights and K/V),
then times,
dispatch overlapped (``--steps`` calls back to back, one block, fastest of 3 rounds):

- ``full``: the step as the engine runs a decode step (its ``decode`` variant);
- ``plain``: the general step (the attention's chunk launch included);
- ``no_attention``: attention replaced by its input q (K/V still written into the pages);
- ``no_kv``: attention and the K/V write both removed (weights, norms, rope, logits only).

Differences give attention's and the K/V write's share; ``no_kv`` against the weight bytes over
the card's streaming limit (``runtime.bandwidth``, measured in the same run) says how close the
matmuls read the weights to the limit. With ``--trace``, a profile of a few full steps is
aggregated by kernel into matmuls / attention / K/V write / the rest (the perfetto trace JSON
that ``jax.profiler`` writes). Prints a table; writes profile.json and profile.md to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax.model.presets import init_random_params, param_bytes, preset_config  # noqa: E402
from paged_jax.runtime import step as step_module  # noqa: E402
from paged_jax.runtime.bandwidth import streaming_limit  # noqa: E402
from paged_jax.runtime.pack import StepInputs  # noqa: E402
from paged_jax.runtime.state import KVState  # noqa: E402

CATEGORIES = (
    ("attention", re.compile(r"rpa_|attention|mosaic", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|dot|matmul|sm90_", re.I)),
    ("kv_write", re.compile(r"scatter|dynamic.update", re.I)),
)


def decode_inputs(
    rng, cfg, batch: int, ctx: int, page_size: int, num_pages: int, max_model_len: int = 0
) -> dict:
    pages_per_seq = -(-ctx // page_size)
    perm = rng.permutation(np.arange(1, num_pages))[: batch * pages_per_seq]
    tables = perm.reshape(batch, pages_per_seq).astype(np.int32)  # i32[S, pages_per_seq]
    # page-table columns of an engine at max_model_len (the rest point at NULL_PAGE)
    extra = max(0, -(-max_model_len // page_size) - pages_per_seq)
    tables = np.pad(tables, ((0, 0), (0, extra)))
    last = ctx - 1
    inputs = StepInputs(
        token_ids=rng.integers(0, cfg.vocab_size, batch, dtype=np.int32),
        positions=np.full(batch, last, np.int32),
        slot_mapping=(tables[:, last // page_size] * page_size + last % page_size).astype(np.int32),
        cu_q_lens=np.arange(batch + 1, dtype=np.int32),
        kv_lens=np.full(batch, ctx, np.int32),
        page_tables=tables,
        num_seqs=np.array([batch], np.int32),
        logits_indices=np.arange(batch, dtype=np.int32),
        temperature=np.zeros(batch, np.float32),
        top_k=np.full(batch, -1, np.int32),
        top_p=np.ones(batch, np.float32),
        min_p=np.zeros(batch, np.float32),
        seeds=np.zeros(batch, np.uint32),
        sample_positions=np.zeros(batch, np.int32),
        do_sample=np.zeros(batch, np.bool_),
        suppress_eos=np.zeros(batch, np.bool_),
        target_ids=np.zeros(batch, np.int32),
        min_tokens=np.zeros(batch, np.int32),
        burst_steps=np.ones(batch, np.int32),
    )
    return {k: jnp.asarray(v) for k, v in dataclasses.asdict(inputs).items()}


def build(cfg, variant: str, params, kv, inputs, impl: str = "auto"):
    """The step compiled as the engine runs a decode step (``full``: the ``decode`` variant;
    ``plain``: the general one), or with attention (and the K/V write) swapped out."""
    saved = (step_module.ragged_paged_attention, step_module.write_kv)
    if variant in ("no_attention", "no_kv"):
        step_module.ragged_paged_attention = lambda q, *a, **k: q
    if variant == "no_kv":
        step_module.write_kv = lambda k_pages, v_pages, *a: (k_pages, v_pages)
    try:  # traced while patched
        fn = step_module.make_step(
            cfg, attn_impl=impl, variant="plain" if variant == "plain" else "decode"
        )
        return jax.jit(fn, donate_argnums=(1,)).lower(params, kv, inputs).compile()
    finally:
        step_module.ragged_paged_attention, step_module.write_kv = saved


def random_kv(cfg, num_pages: int, page_size: int, dtype) -> KVState:
    """Pages of random values (never time on zeros: they can run faster than real data)."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    fill = jax.jit(lambda key: jax.random.normal(key, shape, dtype))
    keys = jax.random.split(jax.random.key(1), 2 * cfg.num_layers)
    pages = [fill(k) for k in keys]
    token_pages = jnp.zeros((num_pages, page_size), jnp.int32)
    return KVState(tuple(pages[: cfg.num_layers]), tuple(pages[cfg.num_layers :]), token_pages)


def time_step(fn, params, kv, inputs, steps: int, rounds: int = 3):
    kv, out = fn(params, kv, inputs)  # compile, warm
    jax.block_until_ready(out)
    best, host = float("inf"), float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            kv, out = fn(params, kv, inputs)
        enqueued = time.perf_counter()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / steps)
        host = min(host, (enqueued - start) / steps)
    return best, host, kv


def aggregate_trace(trace_dir: Path, steps: int) -> dict:
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("*.json.gz"))
    if not files:
        return {"error": f"no trace json under {trace_dir}"}
    events = json.loads(gzip.open(files[-1]).read())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e.get("args", {}).get("name", "")
    gpu_pids = {p for p, n in names.items() if re.search(r"gpu|device|stream", n, re.I)}
    gpu_pids -= {p for p, n in names.items() if re.search(r"host|cpu|python", n, re.I)}
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e:
            per_kernel[e["name"]][0] += e["dur"]
            per_kernel[e["name"]][1] += 1
    cats = defaultdict(float)
    for name, (dur, _) in per_kernel.items():
        cat = next((c for c, rx in CATEGORIES if rx.search(name)), "other")
        cats[cat] += dur / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "processes": {str(p): names[p] for p in gpu_pids},
        "per_step_us": {k: round(v, 1) for k, v in sorted(cats.items())},
        "kernels_per_step": sum(c for _, c in per_kernel.values()) / steps,
        "top_kernels": [
            {"name": n[:120], "us_per_step": round(d / steps, 1), "calls": c} for n, (d, c) in top
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--batch", type=int, default=192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", help="weights and K/V (float32 on CPU)")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--limit-bytes", type=int, default=0, help="default 4 GiB GPU, 256 MiB CPU")
    ap.add_argument("--impl", default="auto", help="attention backend (kernels.IMPLS)")
    ap.add_argument("--max-model-len", type=int, default=0, help="page-table width (default ctx)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = preset_config(args.model.removeprefix("random:"))
    dtype = jnp.dtype(args.dtype)
    params = init_random_params(cfg, dtype)
    weight_bytes = param_bytes(params)
    num_pages = args.batch * -(-args.ctx // args.page_size) + 2
    kv = random_kv(cfg, num_pages, args.page_size, dtype)
    inputs = decode_inputs(np.random.default_rng(0), cfg, args.batch, args.ctx,
                           args.page_size, num_pages, args.max_model_len)  # fmt: skip
    kv_bytes = 2 * cfg.num_layers * args.batch * args.ctx * cfg.kv_size * dtype.itemsize
    on_gpu = jax.devices()[0].platform == "gpu"
    limit = streaming_limit(args.limit_bytes or (4 * 2**30 if on_gpu else 256 * 2**20))
    limit_bw = limit["bytes_per_s"]
    times, host = {}, {}
    for variant in ("full", "plain", "no_attention", "no_kv"):
        fn = build(cfg, variant, params, kv, inputs, args.impl)
        times[variant], host[variant], kv = time_step(fn, params, kv, inputs, args.steps)
    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "model": args.model,
        "impl": args.impl,
        "batch": args.batch,
        "ctx": args.ctx,
        "limit_tbps": limit_bw / 1e12,
        "limit": limit,
        "weight_gb": weight_bytes / 1e9,
        "kv_read_gb": kv_bytes / 1e9,
        "ms": {k: v * 1e3 for k, v in times.items()},
        # host seconds to enqueue one call (dispatch overlapped): above "ms", the host bounds
        "host_ms": {k: v * 1e3 for k, v in host.items()},
        "floor_ms": (weight_bytes + kv_bytes) / limit_bw * 1e3,
        "step_mbu": (weight_bytes + kv_bytes) / times["full"] / limit_bw,
        "attention_ms": (times["full"] - times["no_attention"]) * 1e3,
        "attention_x_limit": kv_bytes / max(times["full"] - times["no_attention"], 1e-9) / limit_bw,
        "kv_write_ms": (times["no_attention"] - times["no_kv"]) * 1e3,
        "weights_x_limit": weight_bytes / times["no_kv"] / limit_bw,
    }
    if args.trace:
        trace_dir = args.out / "trace"
        steps = 5
        fn = build(cfg, "full", params, kv, inputs, args.impl)
        kv, out = fn(params, kv, inputs)
        jax.block_until_ready(out)
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(steps):
                kv, out = fn(params, kv, inputs)
            jax.block_until_ready(out)
        try:
            result["trace"] = aggregate_trace(trace_dir, steps)
        except Exception as e:  # noqa: BLE001 - the timed variants above still stand
            result["trace"] = {"error": f"{type(e).__name__}: {e}"}
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"{result['device']} jax {result['jax']}: {args.model} ({args.impl}), decode batch "
        f"{args.batch} "
        f"x ctx {args.ctx}; limit {limit_bw / 1e12:.2f} TB/s",
        f"weights {result['weight_gb']:.2f} GB, K/V read {result['kv_read_gb']:.2f} GB, floor "
        f"{result['floor_ms']:.2f} ms",
        "| variant | ms | host ms to enqueue |",
        "| --- | --- | --- |",
        *[f"| {k} | {v:.3f} | {result['host_ms'][k]:.3f} |" for k, v in result["ms"].items()],
        f"step MBU {result['step_mbu']:.3f}; attention {result['attention_ms']:.2f} ms "
        f"({result['attention_x_limit']:.2f} x limit); K/V write {result['kv_write_ms']:.2f} ms; "
        f"weights-only step {result['weights_x_limit']:.2f} x limit",
    ]
    if "trace" in result:
        lines.append(json.dumps(result["trace"].get("per_step_us", result["trace"])))
        for k in result["trace"].get("top_kernels", [])[:15]:
            lines.append(f"  {k['us_per_step']:9.1f} us x{k['calls']:4d}  {k['name']}")
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
