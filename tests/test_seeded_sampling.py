"""Seeded sampling gives the same tokens whatever else changes, one test per factor, on the
real step (random:tiny on CPU): the batch around the request, the page size, preemption by
recompute. Across runs (fresh processes): tests/test_resume.py compares two separate
``paged-jax generate`` processes line by line, seeded sampled lines included. The host side
of every factor at once (and n > 1 seeds): tests/test_fuzz_engine.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams

BASE = dict(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32, warmup=False)
NUM = 6


def requests() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 512, size=int(rng.integers(3, 30))).tolist() for _ in range(NUM)]
    params = [
        SamplingParams(
            temperature=t,
            top_k=k,
            top_p=p,
            seed=100 + i,
            max_tokens=12,
            ignore_eos=True,
            detokenize=False,
        )  # fmt: skip
        for i, (t, k, p) in enumerate([(1.0, -1, 1.0), (0.7, 50, 1.0), (1.3, -1, 0.9)] * 2)
    ]
    return prompts, params


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def roomy():
    llm = LLM("random:tiny", page_size=16, num_pages=64, **BASE)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def reference(roomy):
    prompts, params = requests()
    return [tokens(roomy.generate([p], [sp], use_tqdm=False))[0]
            for p, sp in zip(prompts, params, strict=True)]  # fmt: skip


def test_batch_composition(roomy, reference):
    prompts, params = requests()
    assert tokens(roomy.generate(prompts, params, use_tqdm=False)) == reference
    # reversed, with unseeded neighbours of other lengths in between
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 512, size=9).tolist() for _ in range(NUM)]
    mixed_prompts = [x for pair in zip(noise, prompts[::-1], strict=True) for x in pair]
    filler = SamplingParams(temperature=1.0, max_tokens=5, detokenize=False)
    mixed_params = [x for pair in zip([filler] * NUM, params[::-1], strict=True) for x in pair]
    outs = tokens(roomy.generate(mixed_prompts, mixed_params, use_tqdm=False))
    assert outs[1::2] == reference[::-1]
    other = dataclasses.replace(params[0], seed=999)
    assert tokens(roomy.generate([prompts[0]], [other], use_tqdm=False))[0] != reference[0]


@pytest.fixture(scope="module")
def small_pages():
    # page_size 4 and 17 usable pages: one max_model_len sequence fits, six at once do not
    llm = LLM("random:tiny", page_size=4, num_pages=18, **BASE)
    yield llm
    llm.close()


def test_page_size(small_pages, reference):
    prompts, params = requests()
    before = small_pages.stats()["preemptions"]
    alone = [tokens(small_pages.generate([p], [sp], use_tqdm=False))[0]
             for p, sp in zip(prompts, params, strict=True)]  # fmt: skip
    assert alone == reference
    assert small_pages.stats()["preemptions"] == before  # one at a time: nothing preempted


def test_preemption(small_pages, reference):
    prompts, params = requests()
    before = small_pages.stats()["preemptions"]
    assert tokens(small_pages.generate(prompts, params, use_tqdm=False)) == reference
    assert small_pages.stats()["preemptions"] > before
