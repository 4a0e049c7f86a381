"""The engine on the TPU kernel without a TPU: attn_impl="tpu" on CPU runs the Mosaic kernel in
the TPU interpreter (slow: for checking, not speed). Bundled SmolLM2, greedy, a prefill chunk,
decode bursts and a pool small enough to preempt: tokens equal HF transformers' (fixture)."""

from __future__ import annotations

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_engine_on_the_interpreted_tpu_kernel_matches_hf(smollm2_gguf, data_dir):
    ref = np.load(data_dir / "logits_smollm2-135m.npz")
    prompts = [ref["prompt_2"].tolist(), ref["prompt_3"].tolist()]  # 10 and 37 tokens
    expected = [ref["greedy_2"][:4].tolist(), ref["greedy_3"][:4].tolist()]
    llm = LLM(  # 3 usable pages of 16 for 1 + 3 needed; 16-token steps chunk the 37
        "smollm2-135m", attn_impl="tpu", max_model_len=48, max_num_seqs=8,
        max_num_batched_tokens=16, num_pages=4, warmup=False,
    )  # fmt: skip
    assert llm._driver.runner.attn_impl == "tpu_interpret"
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, detokenize=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.stats()["preemptions"] > 0
