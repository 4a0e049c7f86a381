"""Lower every executable the engine compiles at warmup for TPU, on this (CPU) machine.

    python scripts/lower_tpu.py --model smollm2-135m [--chip v6e] [--json] [key=value ...]

The model's shapes only (``random:<preset>``, a preset name, an HF directory or config.json):
params and KV pages are ``jax.ShapeDtypeStruct`` leaves, so
nothing is allocated. The runner is built as on a TPU of generation ``--chip``
(``platform="tpu"``: the Mosaic kernel, bf16 params and KV unless ``dtype=`` says otherwise, the
chip table's page size unless ``page_size=`` says otherwise) and every key of its warmup (each
step bucket and variant, the selectors, the page copies, the burst advances) goes through
``jax.export.export(..., platforms=("tpu",))``.

``tensor_parallel_size=N``: the same executables of the tensor-parallel engine
(``runtime/tp.py``), over a mesh of N host-platform CPU devices (the script asks XLA for them
before jax starts): params and KV pages carry their global shapes and ``NamedSharding``, the step
runs under ``shard_map``, and the count of all-reduces in a step is reported.

Then the attention kernel alone (one shard's heads) is exported with each TPU generation's block
sizes and page size (``paged_jax.kernels.tpu_chips``) and its VMEM use is checked against that
generation's scoped limit. Prints the counts and every failure; exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _ask_for_host_devices(argv: list[str]) -> None:
    """Lowering happens on CPU; ``tensor_parallel_size=N`` needs N CPU devices, which XLA
    creates only when told before jax starts."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sizes = [v for k, _, v in (a.partition("=") for a in argv) if k == "tensor_parallel_size"]
    if sizes and sizes[-1].strip().isdigit() and int(sizes[-1]) > 1:
        flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", ""))
        os.environ["XLA_FLAGS"] = f"{flags.strip()} {_DEVICE_COUNT_FLAG}={int(sizes[-1])}".strip()


if __name__ == "__main__":
    _ask_for_host_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax.config import EngineConfig, load_config  # noqa: E402
from paged_jax.kernels import resolve_page_size, tpu  # noqa: E402
from paged_jax.kernels.tpu_chips import CHIPS, TpuChip, kernel_vmem_bytes  # noqa: E402
from paged_jax.model.config import ModelConfig, from_hf_config  # noqa: E402
from paged_jax.model.llama import Params  # noqa: E402
from paged_jax.model.presets import PRESETS, init_random_params, preset_config  # noqa: E402
from paged_jax.runtime import tp  # noqa: E402
from paged_jax.runtime.buckets import Buckets  # noqa: E402
from paged_jax.runtime.runner import ModelRunner  # noqa: E402
from paged_jax.runtime.state import KVState, bytes_per_page  # noqa: E402


def model_config(model: str) -> ModelConfig:
    """Shapes of ``model`` without its weights."""
    name = model.removeprefix("random:")
    if name in PRESETS:
        return preset_config(name)
    path = Path(model)
    if path.is_dir() or path.name == "config.json":
        config = path / "config.json" if path.is_dir() else path
        return from_hf_config(json.loads(config.read_text()))
    raise ValueError(f"model={model!r}: a preset ({', '.join(PRESETS)}), random:<preset>, or an "
                     "HF directory or config.json")  # fmt: skip


def _device_param_bytes(params: Params) -> int:
    """Param bytes one device holds: its shard of each sharded param, all of the others."""

    def nbytes(leaf: jax.ShapeDtypeStruct) -> int:
        sharding = getattr(leaf, "sharding", None)
        shape = leaf.shape
        if isinstance(sharding, NamedSharding):
            shape = sharding.shard_shape(shape)
        return math.prod(shape) * leaf.dtype.itemsize

    return sum(nbytes(x) for x in jax.tree.leaves(params))


def build_runner(cfg: ModelConfig, engine: EngineConfig, chip: TpuChip) -> ModelRunner:
    """The runner that ``engine`` builds on ``chip`` (``tensor_parallel_size`` of them), from
    shapes: KV pool sized to the chip's HBM left after its share of the weights."""
    dtype = jnp.bfloat16 if engine.dtype == "auto" else jnp.dtype(engine.dtype)
    kv_dtype = dtype if engine.kv_dtype == "auto" else jnp.dtype(engine.kv_dtype)
    page_size = resolve_page_size(engine.page_size, "tpu", chip.name)
    size = engine.tensor_parallel_size
    params = jax.eval_shape(lambda: init_random_params(cfg, dtype))
    mesh = None
    if size > 1:
        num_devices = len(jax.devices("cpu"))
        if size > num_devices:
            raise ValueError(
                f"tensor_parallel_size={size}: {num_devices} CPU device(s) to lower over; run "
                f"this script (it asks XLA for them) or set XLA_FLAGS={_DEVICE_COUNT_FLAG}="
                f"{size} before jax starts"
            )
        tp.check_tp_size(cfg, size)
        mesh = tp.make_mesh(size, jax.devices("cpu"))
        params = tp.abstract_params(params, cfg, mesh)
    per_page = bytes_per_page(tp.local_config(cfg, size), page_size, kv_dtype)
    free = chip.hbm_bytes - _device_param_bytes(params)
    num_pages = engine.num_pages or max(2, int(free * engine.kv_memory_fraction // per_page))
    if mesh is None:
        kv = jax.eval_shape(lambda: KVState.create(cfg, num_pages, page_size, kv_dtype))
    else:
        kv = tp.abstract_kv(cfg, mesh, num_pages, page_size, kv_dtype)
    max_model_len = engine.max_model_len or cfg.max_position_embeddings
    return ModelRunner(
        cfg, params, num_pages=num_pages, page_size=page_size,
        max_pages_per_seq=-(-max_model_len // page_size),
        buckets=Buckets.create(engine.max_num_batched_tokens, engine.max_num_seqs),
        kv_dtype=kv_dtype, attn_impl=engine.attn_impl, eos_token_ids=cfg.eos_token_ids,
        mesh=mesh, platform="tpu", kv=kv,
    )  # fmt: skip


def export_tpu(fn: Any, args: tuple) -> jax.export.Exported:
    return jax.export.export(fn, platforms=("tpu",))(*args)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def lower_kernel(
    cfg: ModelConfig, engine: EngineConfig, dtype: Any, failed: list
) -> dict[str, dict]:
    """The kernel on one shard's heads with each chip's block sizes and page size: exported
    (``failed`` gets what did not lower) and its VMEM set against the chip's scoped limit."""
    local = tp.local_config(cfg, engine.tensor_parallel_size)
    q = jax.ShapeDtypeStruct((64, local.num_heads, cfg.head_dim), dtype)  # [T, Hq, D]
    meta = [jax.ShapeDtypeStruct(s, jnp.int32) for s in ((8,), (8, 8), (9,), (1,))]
    out = {}
    for name, chip in CHIPS.items():
        page_size = resolve_page_size(engine.page_size, "tpu", name)
        pages = jax.ShapeDtypeStruct((local.num_kv_heads, 64, page_size, cfg.head_dim), dtype)
        used = kernel_vmem_bytes(chip.block_sizes, page_size=page_size, head_dim=cfg.head_dim,
                                 group=local.num_heads // local.num_kv_heads,
                                 dtype=dtype)  # fmt: skip
        out[name] = {"page_size": page_size, "vmem": used, "limit": chip.scoped_vmem_bytes,
                     "lowered": False}  # fmt: skip
        if used > chip.scoped_vmem_bytes:
            failed.append((f"kernel on {name}", f"VMEM {used} > {chip.scoped_vmem_bytes}"))
        kernel = jax.jit(
            lambda *a, _s=chip.block_sizes: tpu.ragged_paged_attention(
                *a, sm_scale=cfg.head_dim**-0.5, block_sizes=_s
            )
        )
        try:
            export_tpu(kernel, (q, pages, pages, *meta))
            out[name]["lowered"] = True
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            failed.append((f"kernel with {name} block sizes, page_size={page_size}", _error(e)))
    return out


def lower_all(model: str, overrides: list[str], chip_name: str = "v6e") -> dict:
    """{"lowered": n, "failed": [(what, error)], "kernel": {chip: {...}}, ...}."""
    engine = load_config(overrides=overrides)
    cfg = model_config(model)
    runner = build_runner(cfg, engine, CHIPS[chip_name])
    keys = runner.warmup_keys(logprobs=True, decode_bursts=engine.decode_steps > 1)
    lowered, failed, step = 0, [], None
    start = time.perf_counter()
    for key in keys:
        try:
            exported = export_tpu(*runner.lower_args(key))
            lowered += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            failed.append((f"T={key[0]} S={key[1]} {key[2]}", _error(e)))
            continue
        if key.kind == "plain" and step is None:
            step = exported
    kernel = lower_kernel(cfg, engine, runner.kv.k_pages[0].dtype, failed)
    return {
        "model": model,
        "chip": chip_name,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "page_size": runner.page_size,
        "executables": len(keys),
        "lowered": lowered + sum(k["lowered"] for k in kernel.values()),
        "failed": failed,
        # the first plain step: devices it runs on, its collectives
        "num_devices": step and step.nr_devices,
        "all_reduces": step and step.mlir_module().count("stablehlo.all_reduce"),
        "kernel": kernel,
        "num_pages": runner.kv.k_pages[0].shape[1],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--chip", default="v6e", choices=sorted(CHIPS), help="page size and KV pool of this TPU"
    )
    ap.add_argument("--json", action="store_true", help="the result as one JSON line, last")
    ap.add_argument("overrides", nargs="*", help="engine key=value")
    args = ap.parse_args(argv)
    r = lower_all(args.model, args.overrides, args.chip)
    tp_note = f", tp {r['tensor_parallel_size']}: {r['all_reduces']} all-reduces a step"
    print(f"{r['model']}: lowered {r['lowered']} for TPU ({r['executables']} engine executables "
          f"+ the kernel with {len(CHIPS)} chips' block sizes), {len(r['failed'])} failed, "
          f"{r['seconds']:.1f}s; page_size {r['page_size']}, KV pool {r['num_pages']} pages on "
          f"a {args.chip}{tp_note if r['tensor_parallel_size'] > 1 else ''}")  # fmt: skip
    for name, k in r["kernel"].items():
        print(f"  kernel on {name} (page_size {k['page_size']}): VMEM "
              f"{k['vmem'] / 2**20:.2f} MiB of {k['limit'] / 2**20:.0f} MiB scoped")  # fmt: skip
    for what, err in r["failed"]:
        print(f"  FAILED {what}: {err}")
    if args.json:
        print(json.dumps(r))
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
