"""Gemma 3 270M (bundled GGUF, Q4_K_M dequantized to f32) against HF transformers on CPU.

References: ``tests/data/logits_gemma3-270m.npz`` and ``gemma3_270m.json`` from
``scripts/make_fixtures.py --only gemma3``. Prompts: three short texts and one of 600 tokens (longer
than the 512-token window of the local layers). Checked: the GGUF tokenizer's ids, logits (max
|delta| over a fixed vocabulary sample plus HF's top-20 at every 64th position), greedy
continuations through the dense path and through the paged engine (page sizes 8/16/32, 64-token
chunked prefill, a pool that preempts), and the long prompt's perplexity via prompt logprobs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import paged_jax.build as build
from paged_jax import LLM, SamplingParams
from paged_jax.model import gemma3
from paged_jax.model.layers import causal_attention

MAX_ABS_LOGIT_DIFF_F32 = 1e-3
MAX_PPL_REL_DIFF = 1e-3  # 0.1%


@pytest.fixture(scope="module")
def loaded(gemma3_gguf):
    """One f32 load for the dense checks and every engine of this module."""
    original = build.load_model
    cached = functools.lru_cache(maxsize=1)(original)
    build.load_model = cached
    yield cached("gemma3-270m", "float32")
    build.load_model = original


@pytest.fixture(scope="module")
def ref(data_dir):
    npz = np.load(data_dir / "logits_gemma3-270m.npz")
    meta = json.loads((data_dir / "gemma3_270m.json").read_text())
    return npz, meta


def _num_prompts(npz) -> int:
    return sum(k.startswith("prompt_") for k in npz.files)


def _dense_logits_at(loaded, ids: list[int], rows: np.ndarray) -> np.ndarray:
    """Dense forward over ``ids``; logits only at ``rows`` (the lm head is most of the cost)."""
    cfg, params = loaded.config, loaded.params
    specs = cfg.attention_specs()

    def attn_fn(layer, q, k, v, cache):
        return causal_attention(q, k, v, specs[layer]), cache

    tokens = jnp.asarray(ids, jnp.int32)
    hidden, _ = gemma3.forward(params, cfg, tokens, jnp.arange(len(ids)), None, attn_fn)
    return np.asarray(gemma3.compute_logits(params, cfg, hidden[jnp.asarray(rows)]))


def test_config_and_tokenizer_match_hf(loaded, ref):
    _, meta = ref
    cfg = loaded.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (18, 640, 4, 1)
    assert (cfg.head_dim, cfg.vocab_size, cfg.sliding_window) == (256, 262144, 512)
    assert list(cfg.layer_types) == meta["layer_types"]
    for case in meta["tokenizer"]:  # <bos> first, as the model expects
        assert loaded.tokenizer.encode(case["text"]) == case["ids"], case["text"]


def test_dense_logits_and_greedy_match_hf(loaded, ref):
    npz, _ = ref
    cols = npz["cols"]
    for i in range(_num_prompts(npz)):
        prompt, greedy = npz[f"prompt_{i}"].tolist(), npz[f"greedy_{i}"].tolist()
        pos = npz[f"pos_{i}"]
        # one teacher-forced forward over prompt + HF's greedy tokens checks both
        n = len(prompt)
        rows = np.r_[pos, np.arange(n - 1, n - 1 + len(greedy))]
        logits = _dense_logits_at(loaded, prompt + greedy, rows)
        at_pos = logits[: len(pos)]
        assert np.abs(at_pos[:, cols] - npz[f"sub_logits_{i}"]).max() <= MAX_ABS_LOGIT_DIFF_F32
        top_ids = npz[f"top_ids_{i}"]
        ours = np.take_along_axis(at_pos, top_ids, axis=1)
        assert np.abs(ours - npz[f"top_vals_{i}"]).max() <= MAX_ABS_LOGIT_DIFF_F32
        assert logits[len(pos) :].argmax(-1).tolist() == greedy, f"prompt {i}"


ENGINES = {
    # page size 8 and 32, 64-token chunks: the 600-token prompt crosses the window mid-chunk
    "ps8": dict(page_size=8, num_pages=128),
    "ps32": dict(page_size=32, num_pages=32),  # + prompt logprobs: perplexity
    # page size 16 with 41 usable pages for ~43 needed: the long prompt preempts the others
    "ps16-preempt": dict(page_size=16, num_pages=42),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_greedy_matches_hf(loaded, ref, name):
    npz, meta = ref
    llm = LLM(
        "gemma3-270m", dtype="float32", max_model_len=640, max_num_seqs=4,
        max_num_batched_tokens=64, warmup=False, **ENGINES[name],
    )  # fmt: skip
    n = _num_prompts(npz)
    prompts = [npz[f"prompt_{i}"].tolist() for i in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=meta["new_tokens"], ignore_eos=True)
    # ps32 also scores the long prompt (the perplexity fixture text) in the same pass
    scored = dataclasses.replace(params, prompt_logprobs=1) if name == "ps32" else params
    outputs = llm.generate(prompts, [params] * (n - 1) + [scored], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [
        npz[f"greedy_{i}"].tolist() for i in range(n)
    ]
    if name == "ps32":
        _check_perplexity(outputs[-1], meta)
    if name.endswith("preempt"):
        assert llm.stats()["preemptions"] > 0
        # text in, text out, <bos> added as the model expects
        out = llm.generate("The capital of France is", params, use_tqdm=False)[0]
        assert out.prompt_token_ids[0] == loaded.tokenizer.bos_token_id == 2
        assert out.outputs[0].text == meta["prompts"][0]["greedy_text"]


def _check_perplexity(out, meta: dict) -> None:
    """Perplexity of the long prompt (the eval text's first tokens) from prompt logprobs."""
    ids = out.prompt_token_ids
    assert len(ids) == meta["ppl"]["num_tokens"]
    nll = -sum(out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids)))
    ppl = math.exp(nll / (len(ids) - 1))
    assert abs(ppl / meta["ppl"]["perplexity"] - 1) <= MAX_PPL_REL_DIFF, ppl
