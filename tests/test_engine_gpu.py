"""On the GPU: the engine's greedy outputs are the same with the Pallas kernel as with the
reference attention (SmolLM2's layer shapes, 4 of its 30 layers, random weights, f32 with
full-precision matmuls so the two differ only by rounding inside attention)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # two engines compiled on demand


def test_gpu_kernel_engine_matches_reference(short_preset):
    # every layer has the same shapes: 4 keep the comparison and shorten the compile
    model = short_preset("smollm2-135m", 4)
    assert jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    lengths = [1, 5, 17, 64, 100, 250, 3, 40]
    prompts = [rng.integers(0, 49152, n).tolist() for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, detokenize=False)
    opts = dict(
        dtype="float32", max_model_len=512, max_num_seqs=8, max_num_batched_tokens=128,
        num_pages=512, warmup=False,
    )  # fmt: skip
    outputs = {}
    with jax.default_matmul_precision("highest"):
        for impl in ("gpu", "reference"):
            llm = LLM(model, attn_impl=impl, **opts)
            outs = llm.generate(prompts, params, use_tqdm=False)
            outputs[impl] = [o.outputs[0].token_ids for o in outs]
    assert outputs["gpu"] == outputs["reference"]
    assert all(len(t) == 24 for t in outputs["gpu"])


def test_fused_bursts_match_step_by_step_bursts(short_preset):
    # a burst as one executable (runtime.burst.make_fused) that unpacks its own inputs
    # (runtime.folded) against its steps dispatched one by one from separately unpacked inputs:
    # same kernel, same tokens, greedy and sampled rows (bf16, llama-1b's layer shapes)
    model = short_preset("llama-1b", 2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 32000, n).tolist() for n in (3, 30, 70, 9, 120, 1)]
    params = [
        SamplingParams(max_tokens=33, ignore_eos=True, detokenize=False, seed=i,
                       temperature=0.0 if i % 2 else 0.7, top_p=1.0 if i % 3 else 0.9)
        for i in range(len(prompts))
    ]  # fmt: skip
    opts = dict(
        dtype="bfloat16", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128,
        num_pages=256, warmup=False, decode_steps=8,
    )  # fmt: skip
    outputs, fused_counts = {}, {}
    for fused in (False, True):
        llm = LLM(model, fused_bursts=fused, fold_inputs=fused, **opts)
        outs = llm.generate(prompts, params, use_tqdm=False)
        outputs[fused] = [o.outputs[0].token_ids for o in outs]
        fused_counts[fused] = llm._driver.runner.num_fused_bursts
    assert outputs[True] == outputs[False]
    assert fused_counts == {False: 0, True: fused_counts[True]} and fused_counts[True] > 0
