"""Batch-invariant mode: with ``batch_invariant=True`` a request's greedy tokens and logprobs are
bit for bit the same whatever else shares its steps, whatever bucket its steps land in, with or
without chunked prefill, decode bursts and prefix-cache hits. On CPU (reference attention,
random weights, f32) here; on the GPU (``gpu`` marker) with bf16 weights and batches of 1..63
other prompts, where the default mode is known to differ (issue 17: its tokens diverge)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams

GREEDY = SamplingParams(
    temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3, detokenize=False
)
SEEDED = SamplingParams(
    temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True, logprobs=3,
    detokenize=False,
)  # fmt: skip


def signature(out) -> tuple:
    """Everything that must match bit for bit: tokens, and each position's logprobs and ranks."""
    c = out.outputs[0]
    lps = tuple(
        tuple(sorted((t, lp.logprob, lp.rank) for t, lp in pos.items())) for pos in c.logprobs
    )
    return tuple(c.token_ids), lps, c.cumulative_logprob


def others(rng: np.random.Generator, count: int, vocab: int, longest: int) -> list[list[int]]:
    return [rng.integers(0, vocab, int(rng.integers(1, longest))).tolist() for _ in range(count)]


def run(llm: LLM, target: list[int], params: SamplingParams, neighbours: list[list[int]]):
    prompts = [*neighbours[: len(neighbours) // 2], target, *neighbours[len(neighbours) // 2 :]]
    sps = [params if p is target else GREEDY for p in prompts]
    outs = llm.generate(prompts, sps, use_tqdm=False)
    return signature(outs[len(neighbours) // 2])


CPU = dict(dtype="float32", max_model_len=256, max_num_seqs=32, warmup=False)


@pytest.fixture(scope="module")
def engines():
    made = {
        "main": LLM("random:tiny", batch_invariant=True, max_num_batched_tokens=64, **CPU),
        "chunked": LLM(
            "random:tiny", batch_invariant=True, max_num_batched_tokens=16, decode_steps=1, **CPU
        ),
    }
    yield made
    for llm in made.values():
        llm.close()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_cpu_bitwise_whatever_the_batch(engines, params):
    rng = np.random.default_rng(3)
    target = rng.integers(0, 512, 45).tolist()
    llm = engines["main"]
    alone = run(llm, target, params, [])
    assert len(alone[0]) == 12
    for count in (1, 3, 7, 15, 31):
        assert run(llm, target, params, others(rng, count, 512, 120)) == alone, count
    # chunked prefill (16-token budget) and no decode bursts: other steps, other buckets
    chunked = engines["chunked"]
    assert run(chunked, target, params, []) == alone
    assert run(chunked, target, params, others(rng, 5, 512, 60)) == alone
    # a prefix-cache hit: a request sharing the target's first 40 tokens runs first
    stats_before = llm.stats()["prefix_cache_hits"]
    llm.generate([target[:40] + [1, 2, 3]], GREEDY, use_tqdm=False)
    assert run(llm, target, params, others(rng, 3, 512, 60)) == alone
    assert llm.stats()["prefix_cache_hits"] > stats_before


def test_cpu_gemma3_window_and_soft_cap():
    # sliding-window and global layers, attention and final soft caps
    rng = np.random.default_rng(4)
    target = rng.integers(0, 512, 30).tolist()
    llm = LLM("random:tiny-gemma3", batch_invariant=True, max_num_batched_tokens=32, **CPU)
    try:
        alone = run(llm, target, GREEDY, [])
        for count in (2, 9):
            assert run(llm, target, GREEDY, others(rng, count, 512, 70)) == alone, count
    finally:
        llm.close()


def test_batch_invariant_rejected_on_tpu_kernel():
    with pytest.raises(ValueError, match="batch_invariant"):
        LLM("random:tiny", batch_invariant=True, attn_impl="tpu", **CPU)


@pytest.mark.gpu
def test_gpu_bitwise_whatever_the_batch(short_preset):
    """llama-1b's layer shapes (4 of its 16 layers: each layer is the same, the compile is
    shorter) in bf16: one prompt alone and inside batches of 1..63 other prompts, also chunked
    (a 64-token budget, no bursts) and after a prefix-cache hit."""
    assert jax.default_backend() == "gpu"
    model = short_preset("llama-1b", 4)
    opts = dict(max_model_len=512, max_num_seqs=64, num_pages=2048, warmup=False)
    rng = np.random.default_rng(5)
    target = rng.integers(0, 128256, 100).tolist()
    llm = LLM(model, batch_invariant=True, max_num_batched_tokens=512, **opts)
    alone = run(llm, target, GREEDY, [])
    for count in (1, 3, 7, 15, 31, 63):
        assert run(llm, target, GREEDY, others(rng, count, 128256, 200)) == alone, count
    llm.generate([target[:80] + [5, 6]], GREEDY, use_tqdm=False)
    assert run(llm, target, GREEDY, others(rng, 7, 128256, 200)) == alone
    llm.close()
    chunked = LLM(
        model, batch_invariant=True, max_num_batched_tokens=64, decode_steps=1,
        **opts,
    )  # fmt: skip
    assert run(chunked, target, GREEDY, others(rng, 7, 128256, 100)) == alone
    chunked.close()
