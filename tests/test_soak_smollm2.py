"""Engine-level soak on CPU with the bundled SmolLM2: NUM_REQUESTS mixed requests (shared
prefixes, n > 1, seeded sampling, stop strings, logprobs) through a small pool that recycles
its pages, once clean and once with NaN written into every free page before each step
(``Driver.poison_free_pages``, a test hook, off by default). A stray read of a page no one
holds would turn logits NaN and change tokens: the outputs must equal the clean run's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams

NUM_REQUESTS = 80  # 200 took 106 s here (2 shared cores); 80 keeps every kind
ENGINE = dict(page_size=8, num_pages=40, max_model_len=96, max_num_seqs=8,
              max_num_batched_tokens=64, warmup=False, decode_steps=4)  # fmt: skip
SYSTEM = "You are a helpful assistant. Answer in one short sentence. "
TOPICS = ["the sea", "a cat", "rain", "Paris", "bread", "music", "the moon", "trains"]


def workload(seed: int) -> tuple[list[str], list[SamplingParams]]:
    rng = np.random.default_rng(seed)
    prompts, params = [], []
    for i in range(NUM_REQUESTS):
        topic = TOPICS[int(rng.integers(len(TOPICS)))]
        text = f"Tell me about {topic}." + " Please." * int(rng.integers(0, 4))
        prompts.append(SYSTEM + text if i % 3 else text)
        kind = i % 5
        if kind == 0:
            params.append(SamplingParams(temperature=0, max_tokens=4))
        elif kind == 1:
            params.append(SamplingParams(n=2, temperature=0.8, seed=i, max_tokens=3))
        elif kind == 2:
            params.append(SamplingParams(temperature=0, max_tokens=6, stop=[" the", "."]))
        elif kind == 3:
            params.append(SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=3,
                                         logprobs=2))  # fmt: skip
        else:
            params.append(SamplingParams(temperature=0, max_tokens=2, min_tokens=2))
    return prompts, params


def outputs(outs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    engine = LLM("smollm2-135m", **ENGINE)
    yield engine
    engine.close()


def test_nan_in_every_free_page_before_each_step_changes_nothing(llm):
    prompts, params = workload(seed=17)
    clean = llm.generate(prompts, params, use_tqdm=False)
    assert llm.stats()["preemptions"] > 0 or llm.kv_cache.num_evictions > 0  # pages recycle
    llm.reset_prefix_cache()
    driver = llm._driver
    driver.poison_free_pages = True
    try:
        poisoned = llm.generate(prompts, params, use_tqdm=False)
    finally:
        driver.poison_free_pages = False
    assert outputs(poisoned) == outputs(clean)
    for o in poisoned:
        for c in o.outputs:
            assert all(math.isfinite(v.logprob) for d in c.logprobs or () for v in d.values())
    # The hook did write NaN: a free page holds it now.
    free = llm.kv_cache.uncached_free_page_ids()
    assert free and np.isnan(np.asarray(driver.runner.kv.k_pages[0][:, free[0]])).all()
    assert llm.kv_cache.num_used_pages == 0
