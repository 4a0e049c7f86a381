"""scripts/lower_tpu.py: every executable the engine warms up exports for TPU from shapes only,
for the bundled SmolLM2 config and Llama-3-8B in bf16, and the kernel fits each chip's VMEM."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lower_tpu.py"


@pytest.fixture(scope="module")
def lower_tpu():
    spec = importlib.util.spec_from_file_location("lower_tpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["smollm2-135m", "random:llama3-8b"])
def test_every_warmup_executable_lowers_for_tpu(lower_tpu, model):
    result = lower_tpu.lower_all(model, ["max_num_batched_tokens=256", "max_num_seqs=32"])
    assert result["failed"] == []
    assert result["lowered"] == result["executables"] + len(lower_tpu.CHIPS)
    assert result["executables"] >= 20  # steps of every bucket, selectors, copies, advances
    for used, limit in result["vmem"].values():
        assert 0 < used < limit


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
