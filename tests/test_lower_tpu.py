"""scripts/lower_tpu.py: every executable the engine warms up exports for TPU from shapes only,
for the bundled SmolLM2 config and Llama-3-8B in bf16, on one chip and tensor parallel (a mesh
of host-platform CPU devices, in a subprocess: the device count is set before jax starts), at
the chip table's page size; the kernel fits each chip's VMEM. The default page size resolves
per platform and chip generation, and a user's value wins."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

from paged_jax import LLM
from paged_jax.kernels import DEFAULT_PAGE_SIZE, resolve_page_size

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lower_tpu.py"
SMALL = ["max_num_batched_tokens=256", "max_num_seqs=32"]


@pytest.fixture(scope="module")
def lower_tpu():
    spec = importlib.util.spec_from_file_location("lower_tpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["smollm2-135m", "random:llama3-8b"])
def test_every_warmup_executable_lowers_for_tpu(lower_tpu, model):
    result = lower_tpu.lower_all(model, SMALL)
    assert result["failed"] == []
    assert result["lowered"] == result["executables"] + len(lower_tpu.CHIPS)
    assert result["executables"] >= 20  # steps of every bucket, selectors, copies, advances
    assert result["page_size"] == lower_tpu.CHIPS["v6e"].page_size  # the table's, lowered
    assert (result["num_devices"], result["all_reduces"]) == (1, 0)
    for name, kernel in result["kernel"].items():  # each chip's page size and block sizes
        assert kernel["lowered"] and 0 < kernel["vmem"] < kernel["limit"]
        assert kernel["page_size"] == lower_tpu.CHIPS[name].page_size


@pytest.mark.parametrize(("model", "size"), [("smollm2-135m", 3), ("random:llama3-8b", 4)])
def test_tensor_parallel_executables_lower_for_tpu(lower_tpu, model, size):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)  # the script asks for the devices itself
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", model, "--json", f"tensor_parallel_size={size}",
         *SMALL],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["failed"] == [] and result["tensor_parallel_size"] == size
    assert result["lowered"] == result["executables"] + len(lower_tpu.CHIPS)
    assert result["executables"] >= 20
    # the step runs on the whole mesh, with two all-reduces ([T, D] psums) per layer
    num_layers = lower_tpu.model_config(model).num_layers
    assert (result["num_devices"], result["all_reduces"]) == (size, 2 * num_layers)


_SAME_AS_PLACED = """
import jax, jax.numpy as jnp
from paged_jax.model.presets import PRESETS, init_random_params
from paged_jax.runtime import tp
for name, size in (("tiny", 2), ("tiny", 4), ("tiny-8kv", 4)):  # tiny at 4: kv heads stored twice
    cfg, mesh = PRESETS[name], tp.make_mesh(size)
    params = init_random_params(cfg, jnp.float32)
    pairs = [(tp.shard_params(params, cfg, mesh), tp.abstract_params(params, cfg, mesh)),
             (tp.create_kv(cfg, mesh, 8, 16, jnp.float32), tp.abstract_kv(cfg, mesh, 8, 16,
                                                                           jnp.float32))]
    for placed, abstract in pairs:
        for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(abstract), strict=True):
            assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding), (name, a, b)
print("ok")
"""


def test_abstract_tp_params_and_kv_are_what_placement_makes():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _SAME_AS_PLACED], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_tensor_parallel_needs_the_devices_in_process(lower_tpu):
    with pytest.raises(ValueError, match="tensor_parallel_size=2.*XLA_FLAGS"):
        lower_tpu.lower_all("smollm2-135m", ["tensor_parallel_size=2"])


def test_the_step_calls_the_mosaic_kernel_in_bf16(lower_tpu):
    from paged_jax.config import load_config

    cfg = lower_tpu.model_config("smollm2-135m")
    runner = lower_tpu.build_runner(cfg, load_config(), lower_tpu.CHIPS["v5e"])
    assert runner.attn_impl == "tpu"  # the real kernel, not its interpreter
    assert runner.kv.k_pages[0].dtype == jax.numpy.bfloat16  # TPU default: bf16 KV and params
    key = next(k for k in runner.warmup_keys() if k.kind == "plain")
    exported = jax.export.export(*runner.lower_args(key)[:1], platforms=("tpu",))(
        *runner.lower_args(key)[1]
    )
    assert "tpu_custom_call" in exported.mlir_module()


def test_unknown_models_are_named(lower_tpu):
    with pytest.raises(ValueError, match="nope"):
        lower_tpu.model_config("nope")


def test_chip_table_names_device_kinds():
    from paged_jax.kernels import tpu, tpu_chips

    kinds = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
             "TPU v6 lite": "v6e", "TPU v6e": "v6e"}  # fmt: skip
    assert {k: tpu_chips.chip_of(k).name for k in kinds} == kinds
    assert tpu_chips.chip_of("NVIDIA H200") is None
    assert tpu.chip_block_sizes() == tpu.DEFAULT_BLOCK_SIZES  # off a TPU


def _fake_device(monkeypatch, platform: str, kind: str) -> None:
    device = types.SimpleNamespace(platform=platform, device_kind=kind)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])


@pytest.mark.parametrize(
    ("platform", "kind", "want"),
    [("cpu", "cpu", 16), ("gpu", "NVIDIA H200", 16), ("tpu", "TPU v5 lite", 32),
     ("tpu", "TPU v5p", 32), ("tpu", "TPU v6 lite", 32), ("tpu", "TPU v4", 32),
     ("tpu", "TPU v99", 16)],
)  # fmt: skip
def test_default_page_size_per_platform_and_chip(monkeypatch, platform, kind, want):
    from paged_jax.kernels import tpu_chips

    if platform == "tpu" and tpu_chips.chip_of(kind) is not None:
        assert want == tpu_chips.chip_of(kind).page_size  # from the table
    assert resolve_page_size(None, platform, kind) == want
    _fake_device(monkeypatch, platform, kind)
    assert resolve_page_size() == want  # this process's device
    assert resolve_page_size(8) == 8  # a user's value wins


def test_engine_page_size_16_on_cpu_unless_set():
    assert resolve_page_size() == DEFAULT_PAGE_SIZE == 16  # this CPU
    options = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_pages=16,
                   warmup=False)  # fmt: skip
    for page_size, want in ((None, 16), (8, 8), (32, 32)):
        llm = LLM("random:tiny", page_size=page_size, **options)
        assert llm.kv_cache.page_size == want == llm.stats()["page_size"]
        llm.close()


def test_lowering_uses_the_chip_page_size_unless_set(lower_tpu):
    from paged_jax.config import load_config

    cfg = lower_tpu.model_config("smollm2-135m")
    for overrides, want in (([], 32), (["page_size=16"], 16), (["page_size=64"], 64)):
        runner = lower_tpu.build_runner(
            cfg, load_config(overrides=overrides), lower_tpu.CHIPS["v5e"]
        )
        assert runner.page_size == want == runner.kv.k_pages[0].shape[2]
