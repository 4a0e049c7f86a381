"""Host seconds of a step call whose wire buffer is resident, put to device memory, or put to
pinned host memory (runtime/wire.py, ``pinned_inputs``); for one step and a fused-burst-like loop.

    python scripts/probe_wire.py llama-1b 256     # model preset, decode batch (ctx 512)

Prints, per case, the median host seconds of the ``device_put`` and of the call, and the host
and wall seconds per call with 30 calls back to back.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding
from profile_step import decode_inputs, random_kv

from paged_jax.model.presets import init_random_params, preset_config
from paged_jax.runtime import step as step_module
from paged_jax.runtime.wire import from_wire, layout_of, to_wire

model = sys.argv[1]
B = int(sys.argv[2])
CTX, PS, CALLS, K = 512, 16, 30, 8
cfg = preset_config(model)
params = init_random_params(cfg, jnp.bfloat16)
num_pages = B * (CTX // PS) + 2
kv = random_kv(cfg, num_pages, PS, jnp.bfloat16)
inputs = decode_inputs(np.random.default_rng(0), cfg, B, CTX, PS, num_pages)
host = {k: np.asarray(v) for k, v in inputs.items()}
layout = layout_of(host)
flat_np = to_wire(host)
dev = jax.devices()[0]
on_dev = SingleDeviceSharding(dev)
pinned = SingleDeviceSharding(dev, memory_kind="pinned_host")
fn = step_module.make_step(cfg, variant="decode")


def loop_fn(p, kv, inp):
    def body(_, c):
        kv, g = c
        kv, out = fn(p, kv, inp)
        return kv, g + out["greedy"]

    return jax.lax.fori_loop(0, K, body, (kv, inp["token_ids"]))


def to_device(f):
    return jax.device_put(f, on_dev)


flat_d = jax.device_put(flat_np, on_dev)
flat_h = jax.device_put(flat_np, pinned)
step_wire = (
    jax.jit(lambda p, kv, f: fn(p, kv, from_wire(f, layout)), donate_argnums=(1,))
    .lower(params, kv, flat_d)
    .compile()
)
try:
    step_wire_h = (
        jax.jit(lambda p, kv, f: fn(p, kv, from_wire(to_device(f), layout)), donate_argnums=(1,))
        .lower(params, kv, flat_h)
        .compile()
    )
    loop_wire_h = (
        jax.jit(
            lambda p, kv, f: loop_fn(p, kv, from_wire(to_device(f), layout)), donate_argnums=(1,)
        )
        .lower(params, kv, flat_h)
        .compile()
    )
except Exception as e:
    print("pinned compile failed:", repr(e)[:500])
    step_wire_h = loop_wire_h = None
loop_wire = (
    jax.jit(lambda p, kv, f: loop_fn(p, kv, from_wire(f, layout)), donate_argnums=(1,))
    .lower(params, kv, flat_d)
    .compile()
)


def run(name, put, call):
    global kv
    kv, out = call(params, kv, put())
    jax.block_until_ready(out)
    for _round in range(2):
        tp, tc = [], []
        t0 = time.perf_counter()
        for _ in range(CALLS):
            a = time.perf_counter()
            f = put()
            b = time.perf_counter()
            kv, out = call(params, kv, f)
            c = time.perf_counter()
            tp.append(b - a)
            tc.append(c - b)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
    print(
        f"{name:34s} put med {np.median(tp) * 1e3:6.3f} ms  "
        f"call med {np.median(tc) * 1e3:7.3f} ms  host/call {(t1 - t0) / CALLS * 1e3:7.3f}  "
        f"wall/call {(t2 - t0) / CALLS * 1e3:7.3f}",
        flush=True,
    )


run("step_wire, fixed device flat", lambda: flat_d, step_wire)
run("step_wire, device_put(device)", lambda: jax.device_put(flat_np, on_dev), step_wire)
if step_wire_h is not None:
    run("step_wire_h, fixed pinned flat", lambda: flat_h, step_wire_h)
    run("step_wire_h, device_put(pinned)", lambda: jax.device_put(flat_np, pinned), step_wire_h)
run("loop_wire, fixed device flat", lambda: flat_d, loop_wire)
run("loop_wire, device_put(device)", lambda: jax.device_put(flat_np, on_dev), loop_wire)
if loop_wire_h is not None:
    run("loop_wire_h, device_put(pinned)", lambda: jax.device_put(flat_np, pinned), loop_wire_h)
