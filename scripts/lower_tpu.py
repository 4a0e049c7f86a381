"""Lower every executable the engine compiles at warmup for TPU, on this (CPU) machine.

    python scripts/lower_tpu.py --model smollm2-135m [--chip v6e] [key=value ...]

The model's shapes only (``random:<preset>``, a preset name, an HF directory or config.json):
params and KV pages are ``jax.ShapeDtypeStruct`` leaves, so
nothing is allocated. The runner is built as on a TPU (``platform="tpu"``: the Mosaic kernel,
bf16 params and KV unless ``dtype=`` says otherwise) and every key of its warmup (each step
bucket and variant, the selectors, the page copies, the burst advances) goes through
``jax.export.export(..., platforms=("tpu",))``. Then the attention kernel alone is exported with
each TPU generation's block sizes (``paged_jax.kernels.tpu_chips``) and its VMEM use is checked
against that generation's scoped limit. Prints the counts and every failure; exit status 1 if
anything failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax.config import load_config  # noqa: E402
from paged_jax.kernels import tpu  # noqa: E402
from paged_jax.kernels.tpu_chips import CHIPS, kernel_vmem_bytes  # noqa: E402
from paged_jax.model.config import ModelConfig, from_hf_config  # noqa: E402
from paged_jax.model.presets import PRESETS, init_random_params, preset_config  # noqa: E402
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


def build_runner(cfg: ModelConfig, engine, chip) -> ModelRunner:
    dtype = jnp.bfloat16 if engine.dtype == "auto" else jnp.dtype(engine.dtype)
    kv_dtype = dtype if engine.kv_dtype == "auto" else jnp.dtype(engine.kv_dtype)
    params = jax.eval_shape(lambda: init_random_params(cfg, dtype))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    per_page = bytes_per_page(cfg, engine.page_size, kv_dtype)
    num_pages = engine.num_pages or max(
        2, int((chip.hbm_bytes * engine.kv_memory_fraction - weight_bytes) // per_page)
    )
    kv = jax.eval_shape(lambda: KVState.create(cfg, num_pages, engine.page_size, kv_dtype))
    max_model_len = engine.max_model_len or cfg.max_position_embeddings
    pages = -(-max_model_len // engine.page_size)
    return ModelRunner(
        cfg, params, num_pages=num_pages, page_size=engine.page_size, max_pages_per_seq=pages,
        buckets=Buckets.create(engine.max_num_batched_tokens, engine.max_num_seqs),
        kv_dtype=kv_dtype, attn_impl=engine.attn_impl, eos_token_ids=cfg.eos_token_ids,
        platform="tpu", kv=kv,
    )  # fmt: skip


def export_tpu(fn, args) -> None:
    jax.export.export(fn, platforms=("tpu",))(*args)


def lower_all(model: str, overrides: list[str], chip_name: str = "v6e") -> dict:
    """{"lowered": n, "failed": [(what, error)], "vmem": {chip: (bytes, limit)}, ...}."""
    chip = CHIPS[chip_name]
    engine = load_config(overrides=overrides)
    cfg = model_config(model)
    runner = build_runner(cfg, engine, chip)
    keys = runner.warmup_keys(logprobs=True, decode_bursts=engine.decode_steps > 1)
    lowered, failed = 0, []
    start = time.perf_counter()
    for key in keys:
        try:
            export_tpu(*runner.lower_args(key))
            lowered += 1
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the run
            failed.append((f"T={key[0]} S={key[1]} {key[2]}", f"{type(e).__name__}: {e}"[:400]))
    vmem = {}
    dtype = runner.kv.k_pages[0].dtype
    q = jax.ShapeDtypeStruct((64, cfg.num_heads, cfg.head_dim), dtype)
    pages = jax.ShapeDtypeStruct((cfg.num_kv_heads, 64, engine.page_size, cfg.head_dim), dtype)
    meta = [jax.ShapeDtypeStruct(s, jnp.int32) for s in ((8,), (8, 8), (9,), (1,))]
    for name, c in CHIPS.items():
        used = kernel_vmem_bytes(c.block_sizes, page_size=engine.page_size,
                                 head_dim=cfg.head_dim, group=cfg.num_heads // cfg.num_kv_heads,
                                 dtype=dtype)  # fmt: skip
        vmem[name] = (used, c.scoped_vmem_bytes)
        if used > c.scoped_vmem_bytes:
            failed.append(
                (f"kernel on {name}", f"VMEM {used} > scoped limit {c.scoped_vmem_bytes}")
            )
        kernel = jax.jit(
            lambda *a, _s=c.block_sizes: tpu.ragged_paged_attention(
                *a, sm_scale=cfg.head_dim**-0.5, block_sizes=_s
            )
        )
        try:
            export_tpu(kernel, (q, pages, pages, meta[0], meta[1], meta[2], meta[3]))
            lowered += 1
        except Exception as e:  # noqa: BLE001
            failed.append((f"kernel with {name} block sizes", f"{type(e).__name__}: {e}"[:400]))
    return {
        "model": model,
        "executables": len(keys),
        "lowered": lowered,
        "failed": failed,
        "vmem": vmem,
        "num_pages": runner.kv.k_pages[0].shape[1],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chip", default="v6e", choices=sorted(CHIPS), help="sizes the KV pool")
    ap.add_argument("overrides", nargs="*", help="engine key=value")
    args = ap.parse_args(argv)
    r = lower_all(args.model, args.overrides, args.chip)
    print(f"{r['model']}: lowered {r['lowered']} for TPU ({r['executables']} engine executables "
          f"+ the kernel with {len(CHIPS)} chips' block sizes), {len(r['failed'])} failed, "
          f"{r['seconds']:.1f}s; KV pool {r['num_pages']} pages on a {args.chip}")  # fmt: skip
    for name, (used, limit) in r["vmem"].items():
        print(f"  kernel VMEM on {name}: {used / 2**20:.2f} MiB of {limit / 2**20:.0f} MiB scoped")
    for what, err in r["failed"]:
        print(f"  FAILED {what}: {err}")
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
