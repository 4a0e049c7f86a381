"""The engine's lifetime and its shared loop: dropped or closed engines free their runner,
an engine keeps its zero-compiles guarantee whatever else runs in the process, and streams
interleave with each other and with ``generate`` without losing or mixing text; an abandoned
stream gives its pages back.
"""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import pytest

from paged_jax import LLM, SamplingParams

TINY = dict(
    dtype="float32",
    num_pages=32,
    max_model_len=128,
    max_num_seqs=2,
    max_num_batched_tokens=16,  # one step bucket: quick warmups
    warmup_progress=False,
)
IDS = SamplingParams(temperature=0.0, max_tokens=6, detokenize=False)


def tiny(**overrides) -> LLM:
    return LLM("random:tiny", **{**TINY, **overrides})


def use(llm: LLM) -> list[list[int]]:
    prompts = [[1, 2, 3, 4, 5] * 9, [7] * 3, list(range(100, 170))]
    params = [IDS, SamplingParams(temperature=1.0, seed=3, max_tokens=9, detokenize=False), IDS]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def refs(llm: LLM) -> list[weakref.ref]:
    return [weakref.ref(llm), weakref.ref(llm._driver), weakref.ref(llm._driver.runner),
            weakref.ref(llm.kv_cache)]  # fmt: skip


def assert_dead(references: list[weakref.ref]) -> None:
    gc.collect()
    alive = [r() for r in references if r() is not None]
    assert not alive, f"still referenced: {[type(a).__name__ for a in alive]}"


# ----------------------------------------------------------------------------- (i) lifetime


def test_dropped_engines_are_freed():
    references = []
    outputs = None
    for warmup in (True, False):
        llm = tiny(warmup=warmup)
        got = use(llm)
        assert outputs is None or got == outputs  # same weights, same outputs
        outputs = got
        references += refs(llm)
        del llm
    assert_dead(references)


def test_context_manager_and_close_free_the_engine():
    with tiny() as llm:
        expected = use(llm)
        k_pages = llm._driver.runner.kv.k_pages
        references = refs(llm)
    assert all(page.is_deleted() for page in k_pages)  # the pool is gone at once
    with pytest.raises(RuntimeError, match="closed"):
        llm.generate([[1, 2, 3]], IDS, use_tqdm=False)
    with pytest.raises(RuntimeError, match="closed"):
        llm.stream([1, 2, 3], IDS)
    llm.close()  # twice is fine
    del llm, k_pages
    assert_dead(references)

    llm = tiny(warmup=False)
    assert use(llm) == expected
    g = llm.stream([1, 2, 3], IDS)
    del g  # a stream never started holds nothing
    llm.close()
    assert llm._driver.num_unfinished == 0
    references = refs(llm)
    del llm
    assert_dead(references)


def test_no_compiles_after_warmup_despite_other_engines_and_user_jax_code():
    first = tiny(max_num_seqs=4, max_num_batched_tokens=32)
    before = use(first)
    assert first.stats()["compiles_after_warmup"] == 0
    second = tiny(page_size=8, num_pages=20)  # other shapes
    use(second)

    @jax.jit
    def user_code(x):
        return jnp.cumsum(x * 3 + 1) / 7

    want = sum(3 * i + 1 for i in range(11)) / 7
    assert float(user_code(jnp.arange(11.0))[-1]) == pytest.approx(want)
    assert use(first) == before
    first.generate([list(range(i, i + n)) for i, n in ((0, 1), (5, 63), (9, 64), (3, 100))],
                   IDS, use_tqdm=False)  # fmt: skip
    assert first.stats()["compiles_after_warmup"] == 0
    assert second.stats()["compiles_after_warmup"] == 0
    # The counter does count this engine's own compiles: logprobs were not warmed up.
    first.generate([[1, 2, 3]], SamplingParams(max_tokens=2, logprobs=1, detokenize=False),
                   use_tqdm=False)  # fmt: skip
    assert first.stats()["compiles_after_warmup"] > 0
    first.close()
    second.close()


# ----------------------------------------------------------------------------- streams


@pytest.fixture(scope="module")
def smol():
    llm = LLM(
        "smollm2-135m",
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=256,
        num_pages=64,
        warmup=False,  # compiles the few buckets these tests reach, when they reach them
    )
    yield llm
    llm.close()


TEXT = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn is",
           "def fibonacci(n):"]  # fmt: skip


@pytest.fixture(scope="module")
def expected(smol):
    """Each prompt's text, generated alone; an uninterrupted stream yields the same."""
    texts = {p: smol.generate(p, TEXT, use_tqdm=False)[0].outputs[0].text for p in PROMPTS}
    pieces = list(smol.stream(PROMPTS[0], TEXT))
    assert len(pieces) > 1 and "".join(pieces) == texts[PROMPTS[0]]
    assert all(texts.values())
    return texts


def assert_idle(llm):
    assert llm.kv_cache.num_used_pages == 0
    assert llm._driver.num_unfinished == 0 and not llm._driver.scheduler.has_unfinished()
    llm.kv_cache.check()


def test_half_read_stream_then_generate(smol, expected):
    g = smol.stream(PROMPTS[0], TEXT)
    first = next(g)
    assert first and expected[PROMPTS[0]].startswith(first)
    outs = smol.generate(PROMPTS[1:3], TEXT, use_tqdm=False)  # also advances the stream
    assert [o.outputs[0].text for o in outs] == [expected[p] for p in PROMPTS[1:3]]
    assert first + "".join(g) == expected[PROMPTS[0]]
    assert_idle(smol)


def test_interleaved_streams_each_get_their_own_text(smol, expected):
    streams = {p: smol.stream(p, TEXT) for p in PROMPTS[:3]}
    texts = dict.fromkeys(streams, "")
    while streams:
        for p, g in list(streams.items()):  # one piece of each in turn
            try:
                texts[p] += next(g)
            except StopIteration:
                del streams[p]
    assert texts == {p: expected[p] for p in PROMPTS[:3]}
    assert_idle(smol)


def test_step_loops_freeze_the_heap_until_the_last_ends(smol, expected):
    """The collector skips the objects that existed when the loop started (no full pass over
    the engine mid-run) while any stream or generate is running, and nothing stays frozen."""
    before = gc.get_freeze_count()  # 0 here; an image may freeze a few hundred at import
    a, b = smol.stream(PROMPTS[0], TEXT), smol.stream(PROMPTS[1], TEXT)
    first_a = next(a)
    assert gc.get_freeze_count() > before + 1000  # the engine, its executables, the test
    first_b = next(b)  # a second loop: the heap stays frozen as it is
    assert first_a + "".join(a) == expected[PROMPTS[0]]
    assert gc.get_freeze_count() > before + 1000  # b still runs
    assert first_b + "".join(b) == expected[PROMPTS[1]]
    assert gc.get_freeze_count() == 0
    assert_idle(smol)


@pytest.mark.parametrize("how", ["close", "del"])
def test_abandoned_stream_frees_its_pages(smol, expected, how):
    g = smol.stream(PROMPTS[3], TEXT)
    assert smol._driver.num_unfinished == 0  # nothing happens before the first next()
    first = next(g)
    assert expected[PROMPTS[3]].startswith(first)
    assert smol.kv_cache.num_used_pages > 0 and smol._driver.num_unfinished == 1
    if how == "close":
        g.close()
        assert list(g) == []
    else:
        del g
        gc.collect()
    assert_idle(smol)
    # The engine goes on as before.
    again = smol.generate(PROMPTS[3], TEXT, use_tqdm=False)[0].outputs[0].text
    assert again == expected[PROMPTS[3]]
    assert_idle(smol)


def test_stream_abandoned_while_generate_runs_others(smol, expected):
    g = smol.stream(PROMPTS[2], TEXT)
    next(g)
    h = smol.stream(PROMPTS[1], TEXT)
    next(h)
    g.close()  # the other stream keeps going
    outs = smol.generate([PROMPTS[0]], TEXT, use_tqdm=False)
    assert outs[0].outputs[0].text == expected[PROMPTS[0]]
    h.close()
    assert_idle(smol)
