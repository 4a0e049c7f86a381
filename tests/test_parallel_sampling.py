"""Parallel sampling (``SamplingParams(n=k)``) end to end on random:tiny in f32 (CPU).

A request's k completions are one ``SequenceGroup``: the leader prefills the prompt but its
last token, then every completion is forked off the leader's pages and computes the last
prompt token itself; the first write into the shared, partly filled last page copies it
(copy-on-write). Completion i draws exactly as a lone request seeded
``completion_seed(seed, i)``, so every output here is checked against lone requests.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.engine.sequence import completion_seed

PAGE = 8
VOCAB = 512
ENGINE = dict(
    dtype="float32",
    page_size=PAGE,
    max_model_len=96,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    warmup_progress=False,
)


@pytest.fixture(scope="module")
def on():
    """Prefix caching on (the default), a roomy pool."""
    llm = LLM("random:tiny", num_pages=96, **ENGINE)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def off():
    """Prefix caching off: prompt work and page sharing come from the fork alone."""
    llm = LLM("random:tiny", num_pages=96, enable_prefix_caching=False, **ENGINE)
    yield llm
    llm.close()


def run(llm, prompts, params):
    return llm.generate(prompts, params, use_tqdm=False)


def sampled(seed=None, n=1, max_tokens=12, **kw):
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=max_tokens,
                          detokenize=False, **kw)  # fmt: skip


def greedy(n=1, max_tokens=12, **kw):
    return SamplingParams(n=n, temperature=0.0, max_tokens=max_tokens, detokenize=False, **kw)


def prompt_of(seed, length):
    return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


def completions(out):
    """Token ids of every completion of one RequestOutput, checking their indices."""
    assert [c.index for c in out.outputs] == list(range(len(out.outputs)))
    return [c.token_ids for c in out.outputs]


def assert_idle(llm):
    kv = llm.kv_cache
    assert kv.num_used_pages == 0 and kv.num_filled_tokens == 0 and kv.num_table_pages == 0
    assert llm._driver.num_unfinished == 0 and not llm._driver.scheduler.has_unfinished()
    kv.check()


# ----------------------------------------------------------------------------- determinism


def test_seeded_completions_equal_lone_requests(on):
    prompts = [prompt_of(1, 21), prompt_of(2, 7), prompt_of(3, 40)]
    seeds = [11, 12, 2**32 - 1]  # the largest seed (a larger one is an error, not wrapped)
    outs = run(on, prompts, [sampled(s, n=4) for s in seeds])
    lone_params = [sampled(completion_seed(s, i)) for s in seeds for i in range(4)]
    lone = run(on, [p for p in prompts for _ in range(4)], lone_params)
    for r, (out, seed) in enumerate(zip(outs, seeds, strict=True)):
        got = completions(out)
        assert len(got) == 4 and all(len(t) == 12 for t in got)
        assert got == [o.outputs[0].token_ids for o in lone[4 * r : 4 * r + 4]]
        # Completion 0 is the request's own seed.
        assert got[0] == run(on, [prompts[r]], sampled(seed))[0].outputs[0].token_ids
        assert len({tuple(t) for t in got}) == 4, "seeded completions should differ"
        assert all(c.finish_reason == "length" for c in out.outputs)
    assert_idle(on)


def test_unseeded_completions_are_deterministic_and_differ(on):
    """An unseeded request's seed comes from its request id: the same id twice gives the same
    completions, which are those of lone requests seeded like its completions."""
    prompt = prompt_of(4, 19)
    driver = on._driver
    runs = []
    for _ in range(2):
        driver._request_ids = itertools.count(1000)  # the same request id both times
        (out,) = run(on, [prompt], sampled(n=3))
        assert out.request_id == "1000"
        runs.append(completions(out))
    driver._request_ids = itertools.count(2000)
    assert runs[0] == runs[1]
    assert len({tuple(t) for t in runs[0]}) == 3, "completions of one request must differ"
    base = zlib.crc32(b"1000", on.config.seed & 0xFFFFFFFF)
    lone = run(on, [prompt] * 3, [sampled(completion_seed(base, i)) for i in range(3)])
    assert runs[0] == [o.outputs[0].token_ids for o in lone]
    # Another request id: other draws.
    (other,) = run(on, [prompt], sampled(n=3))
    assert completions(other) != runs[0]
    assert_idle(on)


def test_greedy_completions_are_identical_to_n1(on):
    prompts = [prompt_of(5, 13), prompt_of(6, 33)]
    outs = run(on, prompts, greedy(n=4))
    single = run(on, prompts, greedy())
    for out, one in zip(outs, single, strict=True):
        got = completions(out)
        assert len(got) == 4 and got == [one.outputs[0].token_ids] * 4
    assert_idle(on)


# ----------------------------------------------------------------------------- prefill once


def test_prompt_is_prefilled_once(off):
    """Without prefix caching, an n-completion request computes prompt_len - 1 positions in
    the leader's prefill (prefill_limit = prompt_len - 1), then each of the n forked
    completions computes the last prompt token: prompt_len - 1 + n positions."""
    for length, n in [(21, 4), (70, 4), (9, 2), (1, 3)]:  # 70: a chunked prefill (budget 64)
        prompt = prompt_of(10 + length, length)
        off.reset_stats()
        (out,) = run(off, [prompt], greedy(n=n, max_tokens=3))
        assert len(out.outputs) == n
        assert off.stats()["preemptions"] == 0
        assert off.stats()["prompt_tokens_computed"] == length - 1 + n, (length, n)
        off.reset_stats()
        run(off, [prompt], greedy(max_tokens=3))
        assert off.stats()["prompt_tokens_computed"] == length  # n=1: just the prompt
    assert_idle(off)


# ----------------------------------------------------------------------------- copy-on-write


def test_copy_on_write_of_the_shared_last_page(off, monkeypatch):
    runner, kv = off._driver.runner, off.kv_cache
    length = 2 * PAGE + 5  # the leader prefills 20 tokens: page 2 holds 4, partly filled
    off_slot = (length - 1) % PAGE
    assert off_slot != 0
    copies, src_before, dst_after = [], {}, {}
    real_copy = runner._copy_pages

    def page(pages, layer, p):  # host-side indexing: no jax op (compile) inside the step
        return np.asarray(pages[layer])[:, p]

    def spy(pairs):
        for src, dst in pairs:
            assert kv.ref_count(src) >= 1, "the source must still be held by a completion"
            assert kv.ref_count(dst) == 1
            src_before[src] = [page(a, i, src) for a in (runner.kv.k_pages, runner.kv.v_pages)
                               for i in range(len(a))]  # fmt: skip
        copies.extend(pairs)
        real_copy(pairs)
        for _, dst in pairs:
            dst_after[dst] = [page(a, i, dst) for a in (runner.kv.k_pages, runner.kv.v_pages)
                              for i in range(len(a))]  # fmt: skip

    monkeypatch.setattr(runner, "_copy_pages", spy)
    prompt = prompt_of(20, length)
    (out,) = run(off, [prompt], sampled(seed=3, n=3, max_tokens=6))
    monkeypatch.undo()

    # The first two completions to write copy the shared page; the last one then holds it
    # alone and writes in place. The full page before it is never written: no copy.
    assert len(copies) == 2, copies
    srcs = {s for s, _ in copies}
    dsts = [d for _, d in copies]
    assert len(srcs) == 1 and len(set(dsts)) == 2 and not srcs & set(dsts)
    (src,) = srcs
    before = src_before[src]
    assert any(np.abs(a[:, :off_slot]).sum() > 0 for a in before), "src holds no prompt K/V?"
    for dst in dsts:
        for got, want in zip(dst_after[dst], before, strict=True):
            np.testing.assert_array_equal(got, want)  # the copy is the whole page
    # After the run: the prompt slots before the write offset are untouched, in the source
    # and in both copies.
    for p in [src, *dsts]:
        now = [page(a, i, p) for a in (runner.kv.k_pages, runner.kv.v_pages)
               for i in range(len(a))]  # fmt: skip
        for got, want in zip(now, before, strict=True):
            np.testing.assert_array_equal(got[:, :off_slot], want[:, :off_slot])
    # The first output token (slot off_slot + 1 of each page) differs per completion: each
    # wrote into its own page.
    got = completions(out)
    assert len({t[0] for t in got}) == 3
    first_out = [page(runner.kv.k_pages, 0, p)[:, off_slot + 1] for p in [src, *dsts]]
    for a, b in itertools.combinations(first_out, 2):
        assert not np.array_equal(a, b)
    lone = run(off, [prompt] * 3, [sampled(completion_seed(3, i), max_tokens=6) for i in range(3)])
    assert got == [o.outputs[0].token_ids for o in lone]
    assert_idle(off)


def test_no_copy_when_the_prompt_ends_a_page(off, monkeypatch):
    """length - 1 a multiple of page_size: the forked completions write into fresh pages."""
    runner = off._driver.runner
    copies = []
    real_copy = runner._copy_pages
    monkeypatch.setattr(runner, "_copy_pages", lambda pairs: (copies.extend(pairs),
                                                              real_copy(pairs)))  # fmt: skip
    run(off, [prompt_of(21, 2 * PAGE + 1)], sampled(seed=4, n=3, max_tokens=4))
    assert copies == []
    assert_idle(off)


def test_kv_sharing_saves_pages(off):
    """The saving is sampled after each step, once a finishing step freed its pages: the
    request must outlive the fork step's burst (up to 8 decode steps) to be seen sharing."""
    prompt = prompt_of(22, 45)
    off.reset_stats()
    run(off, [prompt], sampled(seed=5, n=4, max_tokens=24))
    saving = off.stats()["kv_sharing_saving"]
    assert saving > 0
    # The forked completions hold the prompt's pages once: some step uses fewer pages than
    # the page tables hold.
    assert any(r.num_used_pages < r.num_table_pages for r in off.timeline)
    off.reset_stats()
    run(off, [prompt], sampled(seed=5, max_tokens=24))
    assert off.stats()["kv_sharing_saving"] == 0  # n=1, no caching: nothing shared
    assert_idle(off)


# ----------------------------------------------------------------------------- preemption


def test_preempted_groups_give_the_same_completions(on):
    # 15 usable pages: the most one n=3 group of the longest prompt may need at once
    small = LLM("random:tiny", num_pages=16, **ENGINE)
    try:
        prompts = [prompt_of(30 + i, length) for i, length in enumerate([30, 12, 45, 21, 5])]
        params = [sampled(seed=40 + i, n=3, max_tokens=20, ignore_eos=True) for i in range(5)]
        params[1] = greedy(n=3, max_tokens=20, ignore_eos=True)
        got = run(small, prompts, params)
        assert small.stats()["preemptions"] > 0
        want = run(on, prompts, params)
        for g, w in zip(got, want, strict=True):
            assert g.finished and len(g.outputs) == 3
            assert completions(g) == completions(w)
            assert all(len(c.token_ids) == 20 and c.finish_reason == "length" for c in g.outputs)
        assert small.kv_cache.num_used_pages == 0
        assert_idle(small)
    finally:
        small.close()


# ----------------------------------------------------------------------------- NaN pages


def test_nan_in_free_pages_does_not_leak(on, off):
    prompts = [prompt_of(50, 13), prompt_of(51, 30), prompt_of(52, 6)]
    params = [sampled(seed=60, n=3), greedy(n=2), sampled(seed=61, n=4, max_tokens=20)]
    want = [completions(o) for o in run(off, prompts, params)]
    kv, runner = on.kv_cache, on._driver.runner
    on.reset_prefix_cache()  # else most free pages hold cached K/V that hits may read
    free = kv.uncached_free_page_ids()
    assert sorted(free) == list(range(1, kv.num_pages))
    runner.fill_free_pages(free)
    assert np.isnan(np.asarray(runner.kv.k_pages[0])[:, free]).all()
    assert [completions(o) for o in run(on, prompts, params)] == want
    assert_idle(on)
    # Again: the prompts' full pages are hits now, next to pages still holding NaN.
    hits = on.stats()["prefix_cache_hits"]
    assert np.isnan(np.asarray(runner.kv.v_pages[1])[:, kv.uncached_free_page_ids()]).any()
    assert [completions(o) for o in run(on, prompts, params)] == want
    assert on.stats()["prefix_cache_hits"] > hits
    assert_idle(on)


# ----------------------------------------------------------------------------- prefix cache


def test_second_identical_request_hits_the_cache(on):
    prompt = prompt_of(70, 37)
    params = sampled(seed=9, n=3)
    on.reset_stats()
    first = run(on, [prompt], params)
    assert on.stats()["prefix_cache_hits"] == 0  # a new prompt
    on.reset_stats()
    second = run(on, [prompt], params)
    stats = on.stats()
    # The leader looks up the prompt but its last token: 36 tokens, 4 full pages.
    assert stats["prefix_cache_hits"] == (len(prompt) - 1) // PAGE * PAGE
    assert stats["prompt_tokens_computed"] == len(prompt) - 1 + 3 - stats["prefix_cache_hits"]
    assert completions(second[0]) == completions(first[0])
    assert_idle(on)


# ----------------------------------------------------------------------------- bad input


def test_bad_input(on):
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(best_of=2)
    with pytest.raises(ValueError, match="n=0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match=r"9 completions.*max_num_seqs=8"):
        run(on, [prompt_of(80, 5)], sampled(n=9))
    assert_idle(on)
    with pytest.raises(ValueError, match="n=2"):
        on.stream(prompt_of(81, 5), sampled(n=2))
    assert_idle(on)


def test_no_compiles_after_warmup(on, off):
    """Last: every n > 1 run above (sampling, greedy, copies, bursts) used warmed-up code."""
    for llm in (on, off):
        assert llm.stats()["compiles_after_warmup"] == 0


def test_rejected_request_leaves_nothing_queued(on):
    with pytest.raises(ValueError, match="9 completions"):
        run(on, [prompt_of(82, 5), prompt_of(83, 5)], [sampled(seed=1), sampled(n=9)])
    assert on._driver.num_unfinished == 0 and not on._driver.scheduler.has_unfinished()
