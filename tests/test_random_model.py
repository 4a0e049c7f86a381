"""Random-weight presets (the benchmark models): shapes, token-id prompts, contiguous mode."""

from __future__ import annotations

import jax
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.model.presets import PRESETS, init_random_params, param_bytes

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)
OPTS = dict(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32, warmup=False)


def test_preset_shapes():
    cfg = PRESETS["llama2-7b"]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (32, 4096, 32, 32)
    params = jax.eval_shape(lambda: init_random_params(cfg, jax.numpy.bfloat16))
    billions = sum(x.size for x in jax.tree_util.tree_leaves(params)) / 1e9
    assert 6.6 < billions < 6.8  # Llama-2-7B has 6.74B parameters
    small = init_random_params(PRESETS["tiny"], jax.numpy.float32)
    assert param_bytes(small) == 4 * sum(x.size for x in jax.tree_util.tree_leaves(small))


def test_paged_equals_contiguous_and_needs_token_ids():
    prompts = [[5, 6, 7], list(range(1, 40)), [9] * 20]
    paged = LLM("random:tiny", num_pages=64, **OPTS)
    contiguous = LLM(
        "random:tiny", num_pages=64, reserve_full=True, enable_prefix_caching=False, **OPTS
    )
    a = [o.outputs[0].token_ids for o in paged.generate(prompts, PARAMS, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in contiguous.generate(prompts, PARAMS, use_tqdm=False)]
    assert a == b and all(len(t) == 12 for t in a)
    assert paged.stats()["kv_utilization"] > contiguous.stats()["kv_utilization"]
    assert sum(r.num_steps for r in paged.timeline) == paged.stats()["steps"]
    with pytest.raises(ValueError, match="token ids"):
        paged.generate("text", PARAMS, use_tqdm=False)
    with pytest.raises(ValueError, match="detokenize"):
        paged.generate([[1, 2]], SamplingParams(), use_tqdm=False)
