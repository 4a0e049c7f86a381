"""Prefix caching end to end (CPU, random:tiny in f32): every output equals that of the same
engine with ``enable_prefix_caching=False`` (built once per module), token for token and in its
logprobs, whether a request hits pages of a finished request, of a still running one, of its
own preempted self, or nothing (another cache salt, a prompt scored with prompt_logprobs).

The random model is sensitive to its K/V: replacing cached pages by other values changes the
greedy tokens (see ``test_poisoned_hits_change_outputs``), so a wrong hit cannot pass unseen.
"""

from __future__ import annotations

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.engine.kv_cache import NULL_PAGE

PAGE = 8
ENGINE = dict(
    dtype="float32",
    page_size=PAGE,
    max_model_len=96,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    warmup_progress=False,
)
VOCAB = 512


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, **kw)


def seeded(seed, max_tokens=12, **kw):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, detokenize=False,
                          **kw)  # fmt: skip


@pytest.fixture(scope="module")
def on():
    llm = LLM("random:tiny", num_pages=96, **ENGINE)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def off():
    llm = LLM("random:tiny", num_pages=96, enable_prefix_caching=False, **ENGINE)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def small():
    """13 usable pages: a few requests of up to 9 pages each preempt and evict."""
    llm = LLM("random:tiny", num_pages=14, **ENGINE)
    yield llm
    llm.close()


def run(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def assert_same(outputs, reference):
    """Same token ids, and (where asked for) logprobs within 1e-5."""
    assert tokens(outputs) == tokens(reference)
    for got, want in zip(outputs, reference, strict=True):
        assert got.outputs[0].finish_reason == want.outputs[0].finish_reason
        for a, b in zip(got.outputs[0].logprobs or (), want.outputs[0].logprobs or (),
                        strict=True):  # fmt: skip
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
        if want.prompt_logprobs is not None:
            assert got.prompt_logprobs[0] is None is want.prompt_logprobs[0]
            for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:], strict=True):
                assert a.keys() == b.keys()
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a), (a, b)


def assert_idle(llm):
    kv = llm.kv_cache
    assert kv.num_used_pages == 0 and kv.num_filled_tokens == 0
    assert llm._driver.num_unfinished == 0 and not llm._driver.scheduler.has_unfinished()
    kv.check()


def counters(llm):
    s = llm.stats()
    return s["prefix_cache_queries"], s["prefix_cache_hits"]


def shared_prefix_prompts(seed, num, prefix_len=40, tails=(3, 10)):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(0, VOCAB, prefix_len).tolist()
    return prefix, [
        prefix + rng.integers(0, VOCAB, int(rng.integers(tails[0], tails[1] + 1))).tolist()
        for _ in range(num)
    ]


def mixed_params(num, offset=0):
    """Alternating greedy and seeded sampling, all with logprobs."""
    return [greedy(logprobs=2) if i % 2 else seeded(offset + i, logprobs=2) for i in range(num)]


# ----------------------------------------------------------------------------- (a)


def test_shared_prefixes_in_one_call_and_across_calls(on, off):
    prefix, prompts = shared_prefix_prompts(seed=1, num=8)
    params = mixed_params(len(prompts))
    queries, hits = counters(on)
    first = run(on, prompts, params)
    assert_same(first, run(off, prompts, params))
    # The first prompt fills the first step's budget; later admissions hit its prefix pages.
    assert counters(on)[1] > hits
    assert_idle(on)

    _, more = shared_prefix_prompts(seed=2, num=8)
    more = [prefix + p[40:] for p in more]  # the same 40-token prefix, new tails
    queries, hits = counters(on)
    computed = on.stats()["prompt_tokens_computed"]
    second = run(on, more, params)
    assert_same(second, run(off, more, params))
    new_queries, new_hits = counters(on)
    assert new_queries - queries == sum(map(len, more))
    # Every request finds the prefix's 5 full pages cached.
    assert new_hits - hits >= len(more) * (40 // PAGE) * PAGE
    assert on.stats()["prompt_tokens_computed"] - computed <= sum(map(len, more)) - (
        new_hits - hits
    )
    # The engine without caching never hits.
    assert off.stats()["prefix_cache_hits"] == 0 == off.stats()["cached_pages"]
    assert_idle(on)


# ----------------------------------------------------------------------------- (b)


def test_exact_repeat_prefix_and_extension_of_a_cached_prompt(on, off):
    rng = np.random.default_rng(3)
    p48 = rng.integers(0, VOCAB, 6 * PAGE).tolist()  # a multiple of the page size
    params = greedy(logprobs=2)
    first = run(on, [p48], params)
    assert_same(first, run(off, [p48], params))

    def hits_of(prompt, p=params):
        queries, hits = counters(on)
        out = run(on, [prompt], p)
        assert_same(out, run(off, [prompt], p))
        new_queries, new_hits = counters(on)
        assert new_queries - queries == len(prompt)
        return new_hits - hits

    # Exactly the cached prompt: all but its last page hit (its last token is computed).
    assert hits_of(p48) == 5 * PAGE
    assert hits_of(p48, seeded(7)) == 5 * PAGE
    # A prefix of it: the full pages before its last token.
    assert hits_of(p48[:29]) == 3 * PAGE
    assert hits_of(p48[:9]) == PAGE
    assert hits_of(p48[:8]) == 0  # one page only: its last token must be computed
    # The prompt followed by its own output: pages written by decode steps hit too.
    extended = p48 + first[0].outputs[0].token_ids  # 60 tokens, 59 of them computed before
    assert hits_of(extended) == 7 * PAGE
    assert_idle(on)


def test_same_prompt_twice_in_one_batch_hits_the_running_one(on, off):
    rng = np.random.default_rng(4)
    prompt = rng.integers(0, VOCAB, 70).tolist()  # more than one step's budget of 64
    params = [greedy(logprobs=2), greedy(logprobs=2), seeded(5), seeded(5)]
    queries, hits = counters(on)
    outs = run(on, [prompt] * 4, params)
    assert_same(outs, run(off, [prompt] * 4, params))
    assert tokens(outs)[0] == tokens(outs)[1] and tokens(outs)[2] == tokens(outs)[3]
    # Step 1 computes 64 tokens of the first; the others are admitted in step 2, hitting the
    # 8 pages that step committed while the first still runs.
    assert counters(on) == (queries + 4 * 70, hits + 3 * 64)
    assert_idle(on)


def test_hit_on_pages_of_a_request_still_in_prefill(on, off):
    rng = np.random.default_rng(5)
    long = rng.integers(0, VOCAB, 80).tolist()
    other = long[:70] + rng.integers(0, VOCAB, 5).tolist()
    driver, kv = on._driver, on.kv_cache
    first = driver.make_request(long, greedy(logprobs=2))
    driver.add(first)
    driver.stepper.async_scheduling = False  # one step per call (async plans two at first)
    try:
        driver.step()  # the first chunk: 64 of its 80 tokens
    finally:
        driver.stepper.async_scheduling = True
    assert first.seq.num_computed_tokens == 64 and not first.seq.is_finished
    table = kv.page_table(first.seq)
    queries, hits = counters(on)
    second = run(on, [other], greedy(logprobs=2))  # arrives while the first one runs
    assert counters(on) == (queries + len(other), hits + 64)
    assert first.seq.is_finished or kv.page_table(first.seq)[:8] == table[:8]
    for _ in driver.run_until_done([first], use_tqdm=False):
        pass
    assert_same([first.output()], run(off, [long], greedy(logprobs=2)))
    assert_same(second, run(off, [other], greedy(logprobs=2)))
    assert_idle(on)


# ----------------------------------------------------------------------------- (c)


def test_tiny_pool_evicts_and_preempts_with_unchanged_outputs(small, off):
    _, prompts = shared_prefix_prompts(seed=6, num=8)
    _, others = shared_prefix_prompts(seed=7, num=4, prefix_len=24)
    prompts += others
    params = [greedy(16) if i % 2 else seeded(100 + i, 16) for i in range(len(prompts))]
    small.reset_stats()
    outs = run(small, prompts, params)
    stats = small.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_evictions"] > 0
    assert stats["prefix_cache_hits"] > 0
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert all(len(t) == 16 for t in tokens(outs))
    assert_same(outs, run(off, prompts, params))
    assert_idle(small)
    assert small.stats()["used_pages"] == 0


# ----------------------------------------------------------------------------- (d)


def test_nan_in_never_cached_pages_does_not_leak_into_hits(on, off):
    """Poison the free pages that hold no cached K/V (and NULL_PAGE, which padding reads and
    writes): the next run allocates its new pages from exactly those and hits the cached
    prefix pages next to them. Any read of a slot it has not written yet (the tail of its
    last page, a padding row, a page table's padding entries) brings NaN into the outputs.
    The cached (evictable) pages are left alone: the hits read them legitimately."""
    prefix, prompts = shared_prefix_prompts(seed=8, num=6)
    params = mixed_params(len(prompts), offset=50)
    run(on, prompts, params)  # the prefix is cached now
    kv = on.kv_cache
    never_cached = list(kv._free)
    assert never_cached and kv.num_cached_pages > 0
    assert not set(never_cached) & set(kv._evictable)
    on._driver.runner.fill_free_pages([NULL_PAGE, *never_cached])
    _, more = shared_prefix_prompts(seed=9, num=6)
    more = [prefix + p[40:] for p in more]
    hits = counters(on)[1]
    outs = run(on, more, params)
    assert counters(on)[1] - hits >= len(more) * 40 // PAGE * PAGE
    assert_same(outs, run(off, more, params))
    assert_idle(on)


def test_evicted_pages_are_rewritten_before_reuse(small, off):
    """Poison every idle page, cached ones included, then run under another cache salt: it
    cannot hit the poisoned pages, but the tiny pool makes it evict and reuse them, so an
    evicted page read before being rewritten would bring NaN into the outputs."""
    _, prompts = shared_prefix_prompts(seed=10, num=3)
    run(small, prompts, greedy())
    kv = small.kv_cache
    assert kv.num_used_pages == 0 and len(kv._evictable) > 0
    small._driver.runner.fill_free_pages([NULL_PAGE, *kv.free_page_ids()])
    _, others = shared_prefix_prompts(seed=11, num=6)
    params = [greedy(16, cache_salt="fresh") if i % 2 else seeded(i, 16, cache_salt="fresh")
              for i in range(len(others))]  # fmt: skip
    evictions = kv.num_evictions
    outs = run(small, others, params)
    assert kv.num_evictions > evictions
    assert_same(outs, run(off, others, params))
    assert_idle(small)


def test_poisoned_hits_change_outputs(small, off):
    """The control of the two tests above: poisoning the pages a hit reads does change the
    outputs, so NaN leaking through any page read would be seen."""
    rng = np.random.default_rng(12)
    prompt = rng.integers(0, VOCAB, 30).tolist()
    reference = run(off, [prompt], greedy())
    assert_same(run(small, [prompt], greedy()), reference)
    kv = small.kv_cache
    small._driver.runner.fill_free_pages(kv.free_page_ids())  # the cached pages too
    hits = counters(small)[1]
    poisoned = run(small, [prompt], greedy())
    assert counters(small)[1] - hits == 3 * PAGE
    assert tokens(poisoned) != tokens(reference)
    small.reset_prefix_cache()  # forget the poisoned keys
    assert_same(run(small, [prompt], greedy()), reference)
    assert_idle(small)


# ----------------------------------------------------------------------------- (e)


def test_cache_salt_keeps_requests_apart(on, off):
    rng = np.random.default_rng(13)
    prompt = rng.integers(0, VOCAB, 40).tolist()
    reference = run(off, [prompt], greedy(logprobs=2))

    def hits_of(salt):
        hits = counters(on)[1]
        assert_same(run(on, [prompt], greedy(logprobs=2, cache_salt=salt)), reference)
        return counters(on)[1] - hits

    assert hits_of("tenant-a") == 0
    assert hits_of("tenant-b") == 0
    assert hits_of(None) == 0
    assert hits_of("tenant-a") == 4 * PAGE  # (40 - 1) // 8 pages
    assert hits_of("tenant-b") == 4 * PAGE
    assert hits_of(None) == 4 * PAGE
    # Both salts in one batch after a long first chunk: each hits only its own salt's pages.
    other = rng.integers(0, VOCAB, 70).tolist()
    queries, hits = counters(on)
    batch = [greedy(cache_salt="x"), greedy(cache_salt="y"), greedy(cache_salt="x")]
    outs = run(on, [other] * 3, batch)
    assert_same(outs, run(off, [other] * 3, batch))
    assert counters(on) == (queries + 3 * 70, hits + 64)  # only the second "x" hits
    assert_idle(on)


# ----------------------------------------------------------------------------- (f)


def test_prompt_logprobs_next_to_a_cached_prefix(on, off):
    rng = np.random.default_rng(14)
    prompt = rng.integers(0, VOCAB, 50).tolist()
    run(on, [prompt], greedy())  # cache it
    scored = greedy(4, prompt_logprobs=3, logprobs=2)
    queries, hits = counters(on)
    # A scored request computes its whole prompt (no hit); a plain one next to it hits.
    outs = run(on, [prompt, prompt[:45] + [1, 2, 3]], [scored, greedy(logprobs=2)])
    assert counters(on) == (queries + 48, hits + 5 * PAGE)
    assert_same(outs, run(off, [prompt, prompt[:45] + [1, 2, 3]], [scored, greedy(logprobs=2)]))
    assert len(outs[0].prompt_logprobs) == 50
    # Chunked over two steps, with the rest of the batch hitting the cache.
    long = prompt + rng.integers(0, VOCAB, 30).tolist()  # 80 tokens: two chunks
    batch = [scored, greedy(), scored]
    outs = run(on, [long, prompt + [7], long[:60]], batch)
    assert_same(outs, run(off, [long, prompt + [7], long[:60]], batch))
    assert_idle(on)
