"""The paged engine end to end on the bundled SmolLM2 (CPU, reference attention).

Greedy outputs must equal HF transformers' (fixture) whatever the batch, page size, chunking,
preemption or garbage in free pages; seeded sampling must not depend on the batch.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import paged_jax.build as llm_module
from paged_jax import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
SMALL = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)


@pytest.fixture(scope="module", autouse=True)
def shared_weights(smollm2_gguf):
    """Load the GGUF once for every engine in this module."""
    original = llm_module.load_model
    llm_module.load_model = functools.lru_cache(maxsize=2)(original)
    yield
    llm_module.load_model = original


@pytest.fixture(scope="module")
def fixture(data_dir):
    ref = np.load(data_dir / "logits_smollm2-135m.npz")
    n = sum(k.startswith("prompt_") for k in ref.files)
    return [ref[f"prompt_{i}"].tolist() for i in range(n)], [
        ref[f"greedy_{i}"].tolist() for i in range(n)
    ]


@pytest.fixture(scope="module")
def engine():
    return LLM("smollm2-135m", num_pages=64, **SMALL)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def _assert_all_free(llm):
    """No page held: finished requests' full pages may stay cached, but count as free."""
    kv = llm.kv_cache
    assert kv.num_free_pages == kv.num_pages - 1 and kv.num_used_pages == 0
    assert sorted(kv.free_page_ids()) == list(range(1, kv.num_pages))
    assert llm.stats()["used_pages"] == 0
    kv.check()
    assert not llm._driver.scheduler.has_unfinished() and llm._driver.num_unfinished == 0


def test_greedy_batch_and_alone_match_hf(engine, fixture):
    prompts, expected = fixture
    outputs = engine.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(outputs) == expected
    assert [o.request_id for o in outputs] == sorted((o.request_id for o in outputs), key=int)
    for prompt, want in zip(prompts[::2], expected[::2], strict=True):  # alone (two of them)
        assert _tokens(engine.generate([prompt], GREEDY, use_tqdm=False)) == [want]
    assert outputs[0].outputs[0].text.startswith(" Paris.")
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    _assert_all_free(engine)


def test_nan_in_free_pages_does_not_leak(engine, fixture):
    prompts, expected = fixture
    # Cached pages hold live K/V that hits read: drop them first, then poison every page
    # (NULL_PAGE included), since none is held or cached.
    engine.reset_prefix_cache()
    assert engine.kv_cache.num_cached_pages == 0
    engine._driver.runner.fill_free_pages(list(range(engine.kv_cache.num_pages)))
    assert _tokens(engine.generate(prompts, GREEDY, use_tqdm=False)) == expected
    _assert_all_free(engine)
    # Again: now the prompts' full pages are hits, next to pages still holding NaN.
    hits = engine.stats()["prefix_cache_hits"]
    assert _tokens(engine.generate(prompts, GREEDY, use_tqdm=False)) == expected
    assert engine.stats()["prefix_cache_hits"] > hits
    _assert_all_free(engine)


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "nocache"])
def test_preemption_keeps_outputs(fixture, prefix_caching):
    prompts, expected = fixture
    llm = LLM(  # 9 usable pages for ~4 x 5 needed
        "smollm2-135m", num_pages=10, enable_prefix_caching=prefix_caching, **SMALL
    )
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    stats = llm.stats()
    assert stats["preemptions"] > 0
    assert _tokens(outputs) == expected
    # Recomputing a preempted request hits its own full pages when they are still cached.
    assert (stats["prefix_cache_queries"] > 0) == prefix_caching
    assert prefix_caching or stats["prefix_cache_hits"] == stats["cached_pages"] == 0
    _assert_all_free(llm)


@pytest.mark.parametrize("page_size", [1, 8, 32])
def test_page_sizes(page_size, fixture):
    prompts, expected = fixture
    llm = LLM("smollm2-135m", page_size=page_size, num_pages=2048 // page_size, **SMALL)
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_chunked_prefill_budget_16(fixture):
    prompts, expected = fixture
    llm = LLM("smollm2-135m", num_pages=64, **{**SMALL, "max_num_batched_tokens": 16})
    assert _tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


def test_seeded_sampling_independent_of_batch(engine, fixture):
    prompts, _ = fixture
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16)
    alone = _tokens(engine.generate([prompts[2]], seeded, use_tqdm=False))[0]
    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=20) for s in (1, 2, 3)]
    batch = engine.generate(
        [prompts[0], prompts[2], prompts[1], prompts[3]],
        [others[0], seeded, others[1], others[2]],
        use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=16)
    assert _tokens(engine.generate([prompts[2]], other_seed, use_tqdm=False))[0] != alone


def test_stop_strings_and_stream(engine):
    params = SamplingParams(temperature=0.0, max_tokens=32, stop=["answer"])
    out = engine.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
    assert out.text == " Paris.\n\nThe " and out.finish_reason == "stop"
    assert out.stop_reason == "answer"
    pieces = list(
        engine.stream("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
    )
    assert len(pieces) > 1 and "".join(pieces).startswith(" Paris.")


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ("", SamplingParams(), "prompt"),
        ("x " * 200, SamplingParams(), "max_model_len"),
        ([1, 2, 49152], SamplingParams(), "prompt_token_ids"),
        ([{"content": "hi"}], SamplingParams(), "role"),
    ],
)
def test_bad_prompts_name_the_field(engine, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        engine.generate([prompt], params, use_tqdm=False)
    _assert_all_free(engine)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_no_compiles_after_warmup():
    llm = LLM(
        "smollm2-135m", num_pages=48, **{**SMALL, "warmup": True, "max_num_batched_tokens": 32}
    )
    rng = np.random.default_rng(0)
    for lengths in ([1, 127, 5], [64, 2, 33, 17, 9, 1, 100, 40]):
        prompts = [rng.integers(3, 49152, n).tolist() for n in lengths]
        params = [
            SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 6)), ignore_eos=True)
            for _ in lengths
        ]
        llm.generate(prompts, params, use_tqdm=False)
    stats = llm.stats()
    assert stats["compiles_after_warmup"] == 0 and stats["steps"] > 10
    assert 0.0 < stats["kv_utilization"] <= 1.0


def test_min_tokens_masks_eos(engine):
    chat = [{"role": "user", "content": "What is 2+2?"}]
    free = engine.generate([chat], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    ids = free[0].outputs[0].token_ids
    assert free[0].outputs[0].finish_reason == "stop" and len(ids) < 20
    eos = set(engine.tokenizer.eos_token_ids)
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=20)
    forced = engine.generate([chat], params, use_tqdm=False)[0].outputs[0]
    assert len(forced.token_ids) == 20 and not eos & set(forced.token_ids)
    assert forced.token_ids[: len(ids) - 1] == ids[:-1]  # same text up to where EOS was


def test_kv_budget_too_small_says_what_fits():
    with pytest.raises(ValueError, match=r"max_model_len=2048 .* at most \d+ tokens would fit"):
        LLM("smollm2-135m", max_model_len=2048, kv_cpu_bytes=8 * 2**20, warmup=False)


def test_logprobs_match_dense_forward(engine, fixture):
    """Prompt and sampled-token logprobs equal log_softmax of the dense forward's logits,
    also when the prompt is chunked over several steps."""
    import jax
    import jax.numpy as jnp

    from paged_jax.io.loader import load_model
    from paged_jax.model.dense import dense_logits

    prompts, expected = fixture
    prompt = prompts[3] + prompts[3][1:]  # 73 tokens: chunked by the 64-token budget
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=5,
                            prompt_logprobs=3)  # fmt: skip
    outs = engine.generate([prompts[0], prompt], params, use_tqdm=False)
    out = outs[1]
    loaded = load_model("smollm2-135m", "float32")
    ids = prompt + out.outputs[0].token_ids
    ref = np.asarray(
        jax.nn.log_softmax(dense_logits(loaded.params, loaded.config, jnp.asarray([ids]))[0])
    )  # f32[T, V]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert prompt[i] in entry and len(entry) <= 4
        for token_id, lp in entry.items():
            assert abs(lp.logprob - ref[i - 1, token_id]) < 1e-3
        top3 = set(np.argsort(-ref[i - 1])[:3].tolist())
        assert top3 <= set(entry)
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for j, (token_id, entry) in enumerate(zip(out.outputs[0].token_ids, lps, strict=True)):
        pos = len(prompt) - 1 + j
        assert token_id == int(np.argmax(ref[pos]))  # greedy
        assert abs(entry[token_id].logprob - ref[pos, token_id]) < 1e-3 and len(entry) == 5
    assert outs[0].prompt_logprobs is not None and outs[0].outputs[0].token_ids == expected[0][:4]
