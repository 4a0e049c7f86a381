from __future__ import annotations

import pytest

from paged_jax.engine.kv_cache import KVCacheManager
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.engine.sequence import Sequence, SequenceStatus

EOS = 2


def config(**overrides) -> SchedulerConfig:
    fields = dict(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64)
    fields.update(overrides)
    return SchedulerConfig(**fields)


def make(
    *,
    page_size: int = 4,
    num_pages: int = 100,
    enable_prefix_caching: bool = True,
    eos_token_ids=(),
    clock=None,
    **overrides,
) -> Scheduler:
    """A scheduler over its own KV cache manager; overrides are SchedulerConfig fields."""
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=enable_prefix_caching)
    kwargs = {} if clock is None else {"clock": clock}
    return Scheduler(config(**overrides), kv, eos_token_ids=eos_token_ids, **kwargs)


def table(scheduler: Scheduler, s: Sequence) -> tuple[int, ...]:
    table = scheduler.kv_cache.page_table(s)
    assert len(table) == scheduler.kv_cache.num_pages_of(s)
    return table


def seq(request_id: str, num_prompt_tokens: int, **params) -> Sequence:
    params.setdefault("max_tokens", 100)
    return Sequence(request_id, range(10, 10 + num_prompt_tokens), SamplingParams(**params))


def summary(plan) -> list[tuple[str, int, int, bool]]:
    return [(i.request_id, i.start_position, i.num_new_tokens, i.sample) for i in plan.scheduled]


def step(scheduler: Scheduler, token_id: int = 7):
    plan = scheduler.schedule()
    finished = scheduler.update(plan, [token_id] * plan.num_seqs)
    return plan, finished


def test_decodes_first_then_prefills_then_new_with_chunks_filling_budget():
    # The prompts share their first page (10..13): without prefix caching, so every token of
    # b and c is computed (test_prefix_hits_skip_the_shared_pages is this with caching).
    scheduler = make(enable_prefix_caching=False)
    a, b, c = seq("a", 4), seq("b", 12), seq("c", 5)
    scheduler.add(a)
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 0, 4, True)]
    scheduler.add(b)
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 4, 1, True), ("b", 0, 7, False)]
    scheduler.add(c)
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 5, 1, True), ("b", 7, 5, True), ("c", 0, 2, False)]
    assert plan.num_tokens == 8
    assert plan.scheduled[1].token_ids == tuple(range(17, 22))
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 6, 1, True), ("b", 12, 1, True), ("c", 2, 3, True)]
    assert a.output_token_ids == [7, 7, 7, 7] and c.output_token_ids == [7]


def test_prefix_hits_skip_the_shared_pages():
    scheduler = make()
    kv = scheduler.kv_cache
    a, b, c = seq("a", 4), seq("b", 12), seq("c", 5)
    scheduler.add(a)
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 0, 4, True)]
    scheduler.add(b)
    plan, _ = step(scheduler)
    # b's first page (10..13) is a's, computed last step: b starts at 4 and shares it.
    assert summary(plan) == [("a", 4, 1, True), ("b", 4, 7, False)]
    shared = table(scheduler, a)[0]
    assert table(scheduler, b)[0] == shared and kv.ref_count(shared) == 2
    assert plan.scheduled[1].token_ids == tuple(range(14, 21))
    scheduler.add(c)
    plan, _ = step(scheduler)
    # c (10..14) hits the same page; its last token is computed to get its logits.
    assert summary(plan) == [("a", 5, 1, True), ("b", 11, 1, True), ("c", 4, 1, True)]
    assert table(scheduler, c)[0] == shared and kv.ref_count(shared) == 3
    assert (kv.num_queries, kv.num_hits) == (4 + 12 + 5, 0 + 4 + 4)
    assert a.output_token_ids == [7, 7, 7] and b.output_token_ids == [7] == c.output_token_ids
    kv.check()


def test_prompt_logprobs_and_other_cache_salts_get_no_prefix_hit():
    scheduler = make(max_num_batched_tokens=32)
    a = seq("a", 8)
    scheduler.add(a)
    step(scheduler)
    scored, salted, plain = seq("s", 8, prompt_logprobs=1), seq("t", 8, cache_salt="x"), seq("p", 8)
    for s in (scored, salted, plain):
        scheduler.add(s)
    plan, _ = step(scheduler)
    # Same prompt as a: only the plain request reuses a's first page.
    assert summary(plan) == [("a", 8, 1, True), ("s", 0, 8, True), ("t", 0, 8, True),
                             ("p", 4, 4, True)]  # fmt: skip
    assert table(scheduler, plain)[0] == table(scheduler, a)[0]
    first = table(scheduler, a)[0]
    assert first not in (table(scheduler, scored)[0], table(scheduler, salted)[0])
    same_salt = seq("u", 8, cache_salt="x")
    scheduler.add(same_salt)
    plan, _ = step(scheduler)
    assert summary(plan)[-1] == ("u", 4, 4, True)
    assert table(scheduler, same_salt)[0] == table(scheduler, salted)[0]
    scheduler.kv_cache.check()


def test_chunked_prefill_of_a_long_prompt():
    scheduler = make(max_num_batched_tokens=6)
    long = seq("long", 20)
    scheduler.add(long)
    plans = [step(scheduler)[0] for _ in range(4)]
    assert [summary(p) for p in plans] == [
        [("long", 0, 6, False)],
        [("long", 6, 6, False)],
        [("long", 12, 6, False)],
        [("long", 18, 2, True)],
    ]
    assert tuple(plans[1].scheduled[0].page_ids) == (1, 2, 3)  # covers 12 tokens
    assert table(scheduler, long) == (1, 2, 3, 4, 5)  # 20 tokens + the sampled one
    assert long.num_computed_tokens == 20 and long.output_token_ids == [7]


def test_max_num_seqs_is_respected():
    scheduler = make(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [seq(name, 3, max_tokens=2) for name in "abc"]
    for s in seqs:
        scheduler.add(s)
    plan, _ = step(scheduler)
    assert [i.request_id for i in plan.scheduled] == ["a", "b"]
    assert scheduler.num_waiting_seqs == 1
    plan, finished = step(scheduler)
    assert [i.request_id for i in plan.scheduled] == ["a", "b"]
    assert finished == seqs[:2]
    plan, _ = step(scheduler)
    assert summary(plan) == [("c", 0, 3, True)]


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_picks_newest_and_requeues_it_in_front(caching):
    # 4 usable pages of 4 tokens.
    scheduler = make(
        page_size=4, num_pages=5, max_model_len=16, max_num_batched_tokens=16,
        enable_prefix_caching=caching,
    )  # fmt: skip
    kv = scheduler.kv_cache
    a, b, c = seq("a", 2, max_tokens=4), seq("b", 7), seq("c", 1)
    for s in (a, b, c):
        scheduler.add(s)
    plan, _ = step(scheduler)
    # c is not admitted: admission leaves a spare page per running sequence.
    assert summary(plan) == [("a", 0, 2, True), ("b", 0, 7, True)]
    assert [kv.num_pages_of(a), kv.num_pages_of(b)] == [1, 2] and scheduler.num_waiting_seqs == 1
    step(scheduler)
    plan, _ = step(scheduler)  # b takes the last page for position 8
    assert summary(plan) == [("a", 3, 1, True), ("b", 8, 1, True)]
    assert kv.num_free_pages == 0 and len(set(table(scheduler, a) + table(scheduler, b))) == 4
    # a needs a page for position 4: b (newest) is preempted, keeps its outputs, goes before c.
    plan, finished = step(scheduler)
    assert plan.preempted == (b,) and scheduler.num_preemptions == 1
    assert summary(plan) == [("a", 4, 1, True)] and finished == [a]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert table(scheduler, b) == () and kv.num_used_pages == 0
    assert b.output_token_ids == [7, 7, 7] and b.num_preemptions == 1
    # b is recomputed as prompt + outputs; its sampled token becomes output number 3.
    # With prefix caching its two full pages (positions 0..7) are still cached: only 8, 9 run.
    assert list(scheduler._waiting) == [b, c]
    plan, _ = step(scheduler)
    assert summary(plan) == [("b", 8 if caching else 0, 2 if caching else 10, True)]
    assert plan.scheduled[0].sample_position == 3
    assert plan.scheduled[0].token_ids == tuple([*range(10, 17), 7, 7, 7][8 if caching else 0 :])
    assert b.output_token_ids == [7, 7, 7, 7]
    kv.check()


def test_sequence_preempts_itself_when_newest():
    scheduler = make(page_size=4, num_pages=5, max_model_len=16, max_num_batched_tokens=16)
    a, b = seq("a", 4), seq("b", 6)
    scheduler.add(a)
    scheduler.add(b)
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 0, 4, True), ("b", 0, 6, True)]
    plan, _ = step(scheduler)  # a takes the last page
    assert scheduler.kv_cache.num_free_pages == 0
    step(scheduler)
    # b needs a page for position 8 and is the newest running sequence: it waits.
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 6, 1, True)] and plan.preempted == (b,)
    assert b.status is SequenceStatus.WAITING and scheduler.num_running_seqs == 1
    assert table(scheduler, b) == () and scheduler.kv_cache.num_pages_of(a) == 2
    scheduler.kv_cache.check()


def test_victim_scheduled_earlier_in_the_step_is_unscheduled():
    # White-box: make an older prefill meet a newer decode that took the last page.
    scheduler = make(page_size=4, num_pages=5, max_model_len=16, max_num_batched_tokens=16)
    b, a = seq("b", 4), seq("a", 12)
    scheduler.add(b)
    scheduler.add(a)
    plan, _ = step(scheduler)
    assert summary(plan) == [("b", 0, 4, True), ("a", 0, 8, False)]
    scheduler._running = [a, b]  # pretend a was admitted first
    plan = scheduler.schedule()
    assert plan.preempted == (b,)
    assert summary(plan) == [("a", 8, 4, True)] and plan.num_tokens == 4
    assert len(table(scheduler, a)) == 3 and scheduler.kv_cache.num_free_pages == 1
    assert tuple(plan.scheduled[0].page_ids) == table(scheduler, a) and table(scheduler, b) == ()


def test_contiguous_mode_reserves_full_pages():
    scheduler = make(
        max_model_len=32, page_size=4, num_pages=17, reserve_full=True,
        enable_prefix_caching=False,
    )  # fmt: skip
    seqs = [seq(name, 5) for name in "abc"]
    for s in seqs:
        scheduler.add(s)
    plan, _ = step(scheduler)
    assert summary(plan) == [("a", 0, 5, True), ("b", 0, 3, False)]
    plan, _ = step(scheduler)
    assert [scheduler.kv_cache.num_pages_of(s) for s in seqs] == [8, 8, 0]
    assert scheduler.kv_cache.num_free_pages == 0 and scheduler.num_waiting_seqs == 1
    assert scheduler.kv_utilization() == pytest.approx(11 / 64)
    paged = make(max_model_len=32, page_size=4, num_pages=17)
    for s in [seq(name, 5) for name in "abc"]:
        paged.add(s)
    step(paged)
    step(paged)
    assert paged.kv_utilization() > 0.5


def test_contiguous_mode_refuses_prefix_caching():
    kv = KVCacheManager(17, 4)  # prefix caching on by default
    with pytest.raises(ValueError, match="enable_prefix_caching=False"):
        Scheduler(config(max_model_len=32, reserve_full=True), kv)


def test_kv_utilization_counts_cached_tokens():
    scheduler = make()
    assert scheduler.kv_utilization() == 0.0
    scheduler.add(seq("a", 5))
    step(scheduler)
    assert scheduler.kv_utilization() == pytest.approx(5 / 8)


@pytest.mark.parametrize(
    ("params", "tokens", "num_outputs", "reason", "stop_reason"),
    [
        ({}, [5, 6, EOS, 9], 3, "stop", None),
        ({"ignore_eos": True, "max_tokens": 4}, [5, EOS, 6, 7, 8], 4, "length", None),
        ({"min_tokens": 3}, [EOS, EOS, EOS, 9], 3, "stop", None),
        ({"stop_token_ids": [9]}, [5, 9, 6], 2, "stop", 9),
        ({"stop_token_ids": [9], "min_tokens": 2}, [9, 9, 6], 2, "stop", 9),
        ({"max_tokens": 2}, [5, 6, 7], 2, "length", None),
    ],
)
def test_stop_conditions(params, tokens, num_outputs, reason, stop_reason):
    params.setdefault("max_tokens", 100)
    scheduler = make(eos_token_ids=[EOS])
    s = seq("a", 3, **params)
    scheduler.add(s)
    for token in tokens:
        plan = scheduler.schedule()
        if scheduler.update(plan, [token]):
            break
    assert s.output_token_ids == tokens[:num_outputs]
    assert (s.finish_reason, s.stop_reason) == (reason, stop_reason)
    assert s.is_finished and scheduler.kv_cache.num_used_pages == 0 and table(scheduler, s) == ()
    assert not scheduler.has_unfinished()
    scheduler.kv_cache.check()


def test_max_model_len_ends_with_length():
    scheduler = make(max_model_len=6)
    s = seq("a", 4)
    scheduler.add(s)
    step(scheduler)
    _, finished = step(scheduler)
    assert finished == [s] and s.num_tokens == 6 and s.finish_reason == "length"


def test_finish_by_caller_frees_pages_and_update_skips_it():
    times = iter([1.0, 2.0, 3.0])
    scheduler = make(clock=lambda: next(times))
    s = Sequence("a", [1, 2, 3], SamplingParams(), arrival_time=0.5)
    scheduler.add(s)
    step(scheduler)
    plan = scheduler.schedule()
    scheduler.finish(s, "stop", "world")
    assert scheduler.update(plan, [8]) == []
    assert s.output_token_ids == [7] and (s.finish_reason, s.stop_reason) == ("stop", "world")
    assert scheduler.kv_cache.num_used_pages == 0 and not scheduler.has_unfinished()
    assert table(scheduler, s) == ()
    metrics = s.metrics()
    assert metrics.time_to_first_token == 0.5 and metrics.latency == 1.5


def test_add_validates_prompt():
    scheduler = make(max_model_len=8)
    with pytest.raises(ValueError, match="prompt_token_ids.*empty"):
        scheduler.add(seq("a", 0))
    with pytest.raises(ValueError, match="max_model_len=8"):
        scheduler.add(seq("b", 9))
    scheduler.add(seq("c", 8))


def test_update_checks_length():
    scheduler = make()
    scheduler.add(seq("a", 3))
    plan = scheduler.schedule()
    with pytest.raises(ValueError, match="sampled_token_ids"):
        scheduler.update(plan, [])


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"decode_steps": 0}, "decode_steps"),
        ({"max_num_seqs": True}, "max_num_seqs"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        config(**overrides)


@pytest.mark.parametrize(
    ("num_pages", "page_size", "field"),
    [(100, 0, "page_size"), (1, 4, "num_pages"), (2.0, 4, "num_pages"), (100, 1.5, "page_size")],
)
def test_kv_cache_validation(num_pages, page_size, field):
    with pytest.raises(ValueError, match=field):
        KVCacheManager(num_pages, page_size)


def test_scheduler_checks_max_model_len_fits_the_pages():
    with pytest.raises(ValueError, match="max_model_len=400"):
        make(max_model_len=400)
    make(max_model_len=396)  # 99 usable pages of 4 hold 396 tokens


def test_config_error_says_how_many_tokens_fit():
    with pytest.raises(ValueError, match="at most 396 tokens"):
        make(max_model_len=400)


def decode_all(scheduler: Scheduler, *seqs: Sequence) -> None:
    """Admit and prefill every sequence in one step, so the next plan is decode-only."""
    for s in seqs:
        scheduler.add(s)
    plan, _ = step(scheduler)
    assert all(i.sample for i in plan.scheduled)


def test_decode_burst_caps_each_sequence_and_allocates_its_pages():
    scheduler = make(max_num_batched_tokens=32, decode_steps=8, max_model_len=20, page_size=4)
    kv = scheduler.kv_cache
    a, b, c = seq("a", 3, max_tokens=100), seq("b", 3, max_tokens=4), seq("c", 5)
    decode_all(scheduler, a, b, c)
    free = kv.num_free_pages
    plan = scheduler.schedule()
    # a: 8 steps; b: 3 more tokens (max_tokens 4); c: 6 tokens (12 more reach max_model_len 20)
    assert plan.num_steps == (8, 3, 8) and plan.burst_len == 8
    # Step j writes position kv_len - 1 + j: a needs positions 3..10 -> 3 pages in all.
    assert [len(i.page_ids) for i in plan.scheduled] == [3, 2, 4]
    assert [tuple(i.page_ids) for i in plan.scheduled] == [table(scheduler, s) for s in (a, b, c)]
    assert [kv.num_pages_of(s) for s in (a, b, c)] == [3, 2, 4]
    assert kv.num_free_pages == free - (3 + 2 + 4 - (1 + 1 + 2))
    finished = scheduler.update(plan, [list(range(20, 28))] * 3)
    assert a.output_token_ids == [7, *range(20, 28)] and a.num_uncomputed_tokens == 1
    assert b.output_token_ids == [7, 20, 21, 22] and b in finished and b.finish_reason == "length"
    assert c.num_tokens == 5 + 1 + 8 and c.num_computed_tokens == c.num_tokens - 1
    assert table(scheduler, b) == () and kv.num_pages_of(a) == 3
    kv.check()


def test_decode_burst_stops_at_eos_and_drops_later_tokens():
    scheduler = make(max_num_batched_tokens=32, decode_steps=4, eos_token_ids=[EOS])
    a = seq("a", 3)
    decode_all(scheduler, a)
    plan = scheduler.schedule()
    assert plan.num_steps == (4,)
    finished = scheduler.update(plan, [[30, EOS, 31, 32]])
    assert finished == [a] and a.output_token_ids == [7, 30, EOS] and table(scheduler, a) == ()
    assert scheduler.kv_cache.num_used_pages == 0
    scheduler.kv_cache.check()


def test_decode_burst_halves_when_pages_are_short_and_needs_decode_only_plans():
    scheduler = make(
        max_num_batched_tokens=32, decode_steps=8, page_size=2, num_pages=8, max_model_len=14
    )
    a, b = seq("a", 4), seq("b", 4)
    decode_all(scheduler, a, b)  # 5 tokens each: the next decode takes 3 pages each, 1 left
    plan = scheduler.schedule()
    assert plan.num_steps == (2, 2)  # 8 and 4 steps would need 8 and 4 more pages
    scheduler.update(plan, [[1, 2], [3, 4]])
    # Waiting work admitted in a step makes it an ordinary step.
    scheduler = make(max_num_batched_tokens=32, decode_steps=8)
    decode_all(scheduler, seq("a", 3))
    scheduler.add(seq("new", 3))
    assert scheduler.schedule().num_steps == ()
    # So does a request that wants logprobs.
    scheduler = make(max_num_batched_tokens=32, decode_steps=8)
    decode_all(scheduler, seq("a", 3), seq("b", 3, logprobs=2))
    assert scheduler.schedule().num_steps == ()


def test_finish_with_num_output_tokens_drops_the_tail():
    scheduler = make(max_num_batched_tokens=32, decode_steps=4)
    a = seq("a", 3)
    decode_all(scheduler, a)
    plan = scheduler.schedule()
    scheduler.update(plan, [[40, 41, 42, 43]])
    scheduler.finish(a, "stop", "xy", num_output_tokens=3)
    assert a.output_token_ids == [7, 40, 41] and a.finish_reason == "stop"
    assert table(scheduler, a) == () and scheduler.kv_cache.num_used_pages == 0
    scheduler.finish(a, "stop", "x", num_output_tokens=2)  # already finished: still truncates
    assert a.output_token_ids == [7, 40] and a.stop_reason == "x"
