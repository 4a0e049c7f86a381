"""What a jitted call costs the host to enqueue: per argument buffer and per kernel.

    python scripts/probe_dispatch.py --out DIR [--model random:llama-1b --batch 256 --ctx 512]

The engine's decode step on a small model is bound by the host's enqueue of its executables
(``docs/benchmarks.md``: llama-1b, 1.2 ms of host for a 2.7 ms step). This times, dispatch
overlapped (``--calls`` calls back to back, one block, best of 3), the host seconds per call of:

- ``buffers N``: one trivial fusion over N donated f32[8] arguments (the per-buffer cost),
  and 256 arguments read but not donated;
- ``kernels K``: a chain of K small matmul + tanh pairs on one array (the per-kernel cost);
- the engine's decode step, and how its optimized HLO splits into command buffers (CUDA
  graphs) and the thunks between them.

Run it once per ``XLA_FLAGS`` setting to compare (e.g. ``--xla_gpu_enable_command_buffer=``).
Prints a table; writes dispatch.json to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from profile_step import build, decode_inputs, random_kv  # noqa: E402

from paged_jax.model.presets import init_random_params, preset_config  # noqa: E402
from paged_jax.runtime import step as step_module  # noqa: E402


def host_per_call(fn, args, calls: int, donate: bool) -> dict:
    """Host seconds per enqueue and wall seconds per call, ``calls`` back to back."""
    out = fn(*args)
    jax.block_until_ready(out)
    host, wall = float("inf"), float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*(out if donate else args))
        enqueued = time.perf_counter()
        jax.block_until_ready(out)
        host = min(host, (enqueued - start) / calls)
        wall = min(wall, (time.perf_counter() - start) / calls)
    return {"host_us": host * 1e6, "wall_us": wall * 1e6}


def hlo_split(text: str) -> dict:
    """Entry-computation instructions of an optimized HLO module, by kind."""
    entry = text[text.find("ENTRY") :]
    entry = entry[: entry.find("\n}\n")]
    kinds: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        m = re.search(r"=\s*\S+\s+(\w[\w-]*)\(", line)
        if not m:
            continue
        kind = m.group(1)
        if kind == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            kind = f"custom-call:{target.group(1) if target else '?'}"
        if kind == "call" and "command_buffer" in line:
            kind = "command_buffer"
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-1b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--loop", type=int, default=0, help="also K steps in one fori_loop")
    ap.add_argument("--step-only", action="store_true", help="skip the buffer and kernel probes")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if not args.step_only:
        micro(result, args.calls)
    step_probe(result, args)
    (args.out / "dispatch.json").write_text(json.dumps(result, indent=1))
    for name, r in result.items():
        if isinstance(r, dict):
            extra = {k: v for k, v in r.items() if k not in ("host_us", "wall_us")}
            print(f"{name:14s} host {r['host_us']:8.1f} us  wall {r['wall_us']:8.1f} us  {extra}")


def micro(result: dict, calls: int) -> None:
    for n in (1, 16, 64, 256):
        xs = [jnp.full((8,), float(i)) for i in range(n)]
        fn = jax.jit(lambda *a: tuple(x + 1 for x in a), donate_argnums=tuple(range(n)))
        result[f"buffers {n}"] = host_per_call(fn, xs, calls, donate=True)
    xs = [jnp.full((8,), float(i)) for i in range(256)]
    kept = jax.jit(lambda *a: a[0] + a[-1])  # 256 arguments read, not donated; one output
    result["buffers 256 kept"] = host_per_call(kept, xs, calls, donate=False)
    w = jnp.full((256, 256), 0.01, jnp.bfloat16)
    for k in (16, 64, 256):

        def chain(x, w, k=k):
            for _ in range(k):
                x = jnp.tanh(x @ w)
            return x

        x = jnp.ones((64, 256), jnp.bfloat16)
        result[f"kernels {k}"] = host_per_call(jax.jit(chain), (x, w), calls, donate=False)


def step_probe(result: dict, args: argparse.Namespace) -> None:
    cfg = preset_config(args.model.removeprefix("random:"))
    dtype = jnp.dtype(args.dtype)
    params = init_random_params(cfg, dtype)
    num_pages = args.batch * -(-args.ctx // args.page_size) + 2
    kv = random_kv(cfg, num_pages, args.page_size, dtype)
    inputs = decode_inputs(np.random.default_rng(0), cfg, args.batch, args.ctx,
                           args.page_size, num_pages)  # fmt: skip
    step = build(cfg, "full", params, kv, inputs)
    leaves = len(jax.tree.leaves((params, kv, inputs)))
    result["step"], kv = time_calls(lambda kv: step(params, kv, inputs), kv, args.calls)
    result["step"].update(argument_leaves=leaves, entry=hlo_split(step.as_text()))
    if not args.loop:
        return
    # K steps in one executable (a fori_loop over the step; kv in the carry), per step
    fn = step_module.make_step(cfg, variant="decode")

    def loop(params, kv, inputs):
        def body(_, carry):
            kv, greedy = carry
            kv, out = fn(params, kv, inputs)
            return kv, greedy + out["greedy"]

        return jax.lax.fori_loop(0, args.loop, body, (kv, inputs["token_ids"]))

    commands = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
    for name, options in (
        ("loop", None),
        ("loop+WHILE", {"xla_gpu_enable_command_buffer": commands}),
    ):
        try:
            lowered = jax.jit(loop, donate_argnums=(1,)).lower(params, kv, inputs)
            compiled = lowered.compile(options) if options else lowered.compile()
        except Exception as e:  # noqa: BLE001 - report and go on
            result[name] = {"host_us": 0.0, "wall_us": 0.0, "error": str(e)[:300]}
            continue
        r, kv = time_calls(lambda kv, c=compiled: c(params, kv, inputs), kv, args.calls)
        result[name] = {k: v / args.loop for k, v in r.items()} | {"steps_per_call": args.loop}


def time_calls(call, kv, calls: int) -> tuple[dict, object]:
    """Host enqueue and wall seconds per call of ``call(kv) -> (kv, out)``, best of 3."""
    kv, out = call(kv)
    jax.block_until_ready(out)
    host, wall = float("inf"), float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            kv, out = call(kv)
        enqueued = time.perf_counter()
        jax.block_until_ready(out)
        host = min(host, (enqueued - start) / calls)
        wall = min(wall, (time.perf_counter() - start) / calls)
    return {"host_us": host * 1e6, "wall_us": wall * 1e6}, kv


if __name__ == "__main__":
    main()
