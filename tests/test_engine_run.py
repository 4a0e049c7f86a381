"""End-to-end host tests: scheduler + pack + a fake model that reads its "KV" (token ids)
through the packed slot_mapping and page tables, so wrong pages or slots give wrong tokens.
With prefix caching, a hit reads pages another request (or an earlier admission of the same
one) wrote, so a wrong hit or a reused page that was still cached also gives wrong tokens."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_jax.engine.kv_cache import NULL_PAGE, KVCacheManager
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.engine.sequence import Sequence
from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.pack import pack

VOCAB = 97
EOS = 3


def fake_next_token(token_ids: list[int] | np.ndarray) -> int:
    """Deterministic, order-sensitive 'model': depends on every token and its position."""
    tokens = np.asarray(token_ids, np.int64)
    return int((np.arange(1, len(tokens) + 1) * tokens).sum() + 7) % VOCAB


def reference_outputs(
    prompt: list[int], params: SamplingParams, max_model_len: int, eos_ids=()
) -> list[int]:
    tokens = list(prompt)
    outputs: list[int] = []
    while True:
        token = fake_next_token(tokens)
        tokens.append(token)
        outputs.append(token)
        if len(outputs) >= params.min_tokens:
            if not params.ignore_eos and token in eos_ids:
                return outputs
            if token in (params.stop_token_ids or ()):
                return outputs
        if len(outputs) >= params.max_tokens or len(tokens) >= max_model_len:
            return outputs


def run_engine(
    config: SchedulerConfig,
    requests: list[tuple[list[int], SamplingParams]],
    *,
    page_size: int,
    num_pages: int,
    prefix_caching: bool = True,
    eos_ids=(),
    max_steps: int = 100_000,
) -> tuple[dict[str, Sequence], Scheduler]:
    """Drive schedule -> pack -> fake model -> update until every request finishes."""
    kv = KVCacheManager(num_pages, page_size, enable_prefix_caching=prefix_caching)
    scheduler = Scheduler(config, kv, eos_token_ids=eos_ids)
    buckets = Buckets.create(config.max_num_batched_tokens, config.max_num_seqs)
    max_pages_per_seq = kv.pages_for(config.max_model_len)
    cache = np.full(num_pages * page_size, -1, np.int64)  # token "KV" per slot
    seqs = {}
    for i, (prompt, params) in enumerate(requests):
        seq = Sequence(f"req-{i}", prompt, params)
        scheduler.add(seq)
        seqs[seq.request_id] = seq
    num_bursts = 0
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            break
        plan = scheduler.schedule()
        assert plan.num_tokens <= config.max_num_batched_tokens
        assert plan.num_seqs <= config.max_num_seqs
        assert scheduler.num_running_seqs <= config.max_num_seqs
        if plan.is_empty:
            assert plan.preempted, "an empty plan must come from a preemption"
            continue
        num_tokens_bucket, num_seqs_bucket = buckets.pick_bucket(plan.num_tokens, plan.num_seqs)
        inputs = pack(
            plan,
            num_tokens_bucket=num_tokens_bucket,
            num_seqs_bucket=num_seqs_bucket,
            page_size=page_size,
            max_pages_per_seq=max_pages_per_seq,
        )
        for item in plan.scheduled:
            assert tuple(item.page_ids) == kv.page_table(item.seq)
        for src, dst in plan.page_copies:  # copy-on-write, before this step writes K/V
            assert kv.ref_count(dst) == 1
            cache[dst * page_size : (dst + 1) * page_size] = cache[
                src * page_size : (src + 1) * page_size
            ]
        num_real = int(inputs.cu_q_lens[plan.num_seqs])
        assert (inputs.slot_mapping[:num_real] // page_size != NULL_PAGE).all()
        assert (inputs.slot_mapping[num_real:] // page_size == NULL_PAGE).all()
        # A write never lands in a page that another sequence shares (cached prefix pages).
        written = np.unique(inputs.slot_mapping[:num_real] // page_size).tolist()
        assert all(kv.ref_count(page) == 1 for page in written), written
        if plan.num_steps:
            scheduler.update(plan, run_burst(plan, inputs, cache, page_size, kv))
            num_bursts += 1
            kv.check()
            continue
        cache[inputs.slot_mapping] = inputs.token_ids
        sampled = []
        for row in range(plan.num_seqs):
            kv_len = int(inputs.kv_lens[row])
            positions = np.arange(kv_len)
            slots = inputs.page_tables[row, positions // page_size] * page_size
            sampled.append(fake_next_token(cache[slots + positions % page_size]))
        scheduler.update(plan, sampled)
        kv.check()
    else:
        raise AssertionError("engine made no progress")
    # Finished sequences' full pages may stay cached, but they count as free.
    assert kv.num_free_pages == num_pages - 1
    assert kv.num_used_pages == 0 and kv.num_filled_tokens == 0
    assert all(seq.is_finished and kv.num_pages_of(seq) == 0 for seq in seqs.values())
    assert prefix_caching or (kv.num_cached_pages == 0 and kv.num_hits == 0)
    kv.check()
    assert num_bursts == 0 or config.decode_steps > 1
    scheduler.num_bursts = num_bursts  # for the tests' own checks
    return seqs, scheduler


def run_burst(
    plan, inputs, cache: np.ndarray, page_size: int, kv: KVCacheManager
) -> list[list[int]]:
    """A decode burst, step by step: each row writes its token at its next position (through
    its page table, which must already cover the burst) and samples from its cached tokens.
    Rows past their own step count get a junk token, which update must ignore."""
    assert plan.num_tokens == plan.num_seqs and all(i.num_new_tokens == 1 for i in plan.scheduled)
    sampled = [[] for _ in plan.scheduled]
    for row, num_steps in enumerate(plan.num_steps):
        token, kv_len = int(inputs.token_ids[row]), int(inputs.kv_lens[row])
        for j in range(plan.burst_len):
            if j >= num_steps:
                sampled[row].append(10**6)
                continue
            pos = kv_len - 1
            page = inputs.page_tables[row, pos // page_size]
            assert page != NULL_PAGE, "the burst's pages must be allocated up front"
            assert kv.ref_count(page) == 1, "a burst writes into a shared page"
            cache[page * page_size + pos % page_size] = token
            positions = np.arange(kv_len)
            slots = inputs.page_tables[row, positions // page_size] * page_size
            token = fake_next_token(cache[slots + positions % page_size])
            sampled[row].append(token)
            kv_len += 1
    return sampled


def make_requests(seed: int, num_requests: int, max_prompt: int, max_tokens: int):
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_requests):
        prompt = rng.integers(0, VOCAB, size=int(rng.integers(1, max_prompt + 1))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(1, max_tokens + 1)), ignore_eos=True)
        requests.append((prompt, params))
    return requests


CACHING = pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "nocache"])


@CACHING
def test_tiny_pool_and_budget_match_huge_pool_and_preempt(prefix_caching):
    requests = make_requests(seed=0, num_requests=6, max_prompt=20, max_tokens=20)
    huge = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=48)
    tiny = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=5, max_model_len=48)
    kw = dict(page_size=4, prefix_caching=prefix_caching)
    huge_seqs, huge_sched = run_engine(huge, requests, num_pages=200, **kw)
    tiny_seqs, tiny_sched = run_engine(tiny, requests, num_pages=13, **kw)
    assert huge_sched.num_preemptions == 0
    assert tiny_sched.num_preemptions > 0
    assert any(seq.num_preemptions > 0 for seq in tiny_seqs.values())
    # Random prompts share no page: the only hits are preempted requests' own pages.
    assert huge_sched.kv_cache.num_hits == 0
    assert (tiny_sched.kv_cache.num_hits > 0) == prefix_caching
    for request_id, seq in huge_seqs.items():
        prompt, params = requests[int(request_id.split("-")[1])]
        expected = reference_outputs(prompt, params, huge.max_model_len)
        assert seq.output_token_ids == expected
        assert tiny_seqs[request_id].output_token_ids == expected
        assert tiny_seqs[request_id].finish_reason == seq.finish_reason == "length"


@CACHING
def test_single_request_filling_the_pool_finishes(prefix_caching):
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=3, max_model_len=16)
    prompt = list(range(10))
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    seqs, _ = run_engine(
        config, [(prompt, params), (prompt[:3], params)], page_size=4, num_pages=5,
        prefix_caching=prefix_caching,
    )  # fmt: skip
    assert seqs["req-0"].output_token_ids == reference_outputs(prompt, params, 16)
    assert seqs["req-0"].num_tokens == 16 and seqs["req-0"].finish_reason == "length"
    assert seqs["req-1"].num_tokens == 16
    assert seqs["req-1"].output_token_ids == reference_outputs(prompt[:3], params, 16)


def shared_prefix_requests(seed: int, num_requests: int, prefix_len: int):
    """Requests that share a system prompt (some of them entirely: duplicates), each with a
    random tail, as a chat server sees them."""
    rng = np.random.default_rng(seed)
    system = rng.integers(0, VOCAB, size=prefix_len).tolist()
    requests = []
    for i in range(num_requests):
        tail = rng.integers(0, VOCAB, size=int(rng.integers(0, 9)) if i % 3 else 0).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(1, 16)), ignore_eos=True)
        requests.append((system + tail, params))
    return requests


@CACHING
@pytest.mark.parametrize(
    ("page_size", "num_pages", "budget", "decode_steps"),
    [(4, 200, 64, 1), (4, 200, 64, 8), (2, 40, 7, 4), (3, 24, 5, 1)],
    ids=["roomy", "roomy-bursts", "tight", "tight-odd-pages"],
)
def test_shared_prefixes_hit_and_outputs_match_reference(
    prefix_caching, page_size, num_pages, budget, decode_steps
):
    requests = shared_prefix_requests(seed=5, num_requests=12, prefix_len=13)
    config = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=40,
        decode_steps=decode_steps,
    )  # fmt: skip
    seqs, scheduler = run_engine(
        config, requests, page_size=page_size, num_pages=num_pages,
        prefix_caching=prefix_caching,
    )  # fmt: skip
    for i, (prompt, params) in enumerate(requests):
        assert seqs[f"req-{i}"].output_token_ids == reference_outputs(prompt, params, 40)
    kv = scheduler.kv_cache
    # Later requests find the system prompt's full pages cached.
    assert (kv.num_hits >= (13 // page_size) * page_size) == prefix_caching
    assert (kv.num_hits > 0) == prefix_caching


@CACHING
def test_eos_and_min_tokens_end_to_end(prefix_caching):
    requests = make_requests(seed=1, num_requests=8, max_prompt=10, max_tokens=30)
    requests = [
        (p, SamplingParams(max_tokens=s.max_tokens, min_tokens=i % 3, stop_token_ids=[5]))
        for i, (p, s) in enumerate(requests)
    ]
    eos_ids = {EOS, 11, 12, 13}
    for decode_steps in (1, 8):
        config = SchedulerConfig(
            max_num_seqs=3, max_num_batched_tokens=7, max_model_len=40, decode_steps=decode_steps
        )
        seqs, scheduler = run_engine(
            config, requests, page_size=2, num_pages=30, prefix_caching=prefix_caching,
            eos_ids=eos_ids,
        )  # fmt: skip
        assert (scheduler.num_bursts > 0) == (decode_steps > 1)
        for i, (prompt, params) in enumerate(requests):
            expected = reference_outputs(prompt, params, 40, eos_ids)
            assert seqs[f"req-{i}"].output_token_ids == expected


@settings(max_examples=100, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    max_model_len=st.integers(4, 48),
    extra_pages=st.integers(0, 12),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 6),
    mode=st.sampled_from(["cache", "cache", "nocache", "contiguous"]),
    decode_steps=st.sampled_from([1, 2, 3, 8]),
    shared_len=st.integers(0, 40),
    workload=st.lists(
        st.tuples(st.integers(1, 48), st.integers(1, 24), st.integers(0, 2**31), st.booleans()),
        min_size=1,
        max_size=8,
    ),
)
def test_random_workloads_finish_with_expected_outputs(
    page_size,
    max_model_len,
    extra_pages,
    budget,
    max_num_seqs,
    mode,
    decode_steps,
    shared_len,
    workload,
):
    reserve_full = mode == "contiguous"  # contiguous mode shares nothing: no prefix caching
    max_pages_per_seq = -(-max_model_len // page_size)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        reserve_full=reserve_full,
        decode_steps=decode_steps,
    )
    shared = np.random.default_rng(0).integers(0, VOCAB, size=48).tolist()
    requests = []
    for prompt_len, max_tokens, seed, shares in workload:
        rng = np.random.default_rng(seed)
        # Requests that share start with the same shared_len tokens: prefix hits.
        prompt = shared[:shared_len] if shares else []
        prompt = (prompt + rng.integers(0, VOCAB, size=prompt_len).tolist())[:max_model_len]
        requests.append((prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    seqs, scheduler = run_engine(
        config,
        requests,
        page_size=page_size,
        num_pages=1 + max_pages_per_seq + extra_pages,
        prefix_caching=mode == "cache",
    )
    for i, (prompt, params) in enumerate(requests):
        seq = seqs[f"req-{i}"]
        assert seq.output_token_ids == reference_outputs(prompt, params, max_model_len)
        assert seq.prompt_token_ids == prompt
        assert seq.first_token_time is not None and seq.finished_time is not None
    if reserve_full:
        assert scheduler.num_preemptions == 0


@CACHING
def test_seeded_sweep_with_preemptions(prefix_caching):
    """Many random tight-pool workloads (about a third preempt): outputs never change."""
    rng = np.random.default_rng(1234)
    num_preempting = num_bursting = num_hitting = 0
    for _ in range(150):
        page_size = int(rng.choice([1, 2, 4, 8]))
        max_model_len = int(rng.integers(4, 49))
        max_pages_per_seq = -(-max_model_len // page_size)
        config = SchedulerConfig(
            max_num_seqs=int(rng.integers(1, 7)),
            max_num_batched_tokens=int(rng.integers(1, 65)),
            max_model_len=max_model_len,
            decode_steps=int(rng.choice([1, 4, 8])),
        )
        num_pages = 1 + max_pages_per_seq + int(rng.integers(0, 13))
        requests = []
        for _ in range(int(rng.integers(1, 9))):
            prompt_len = min(int(rng.integers(1, 49)), max_model_len)
            prompt = rng.integers(0, VOCAB, size=prompt_len).tolist()
            params = SamplingParams(max_tokens=int(rng.integers(1, 25)), ignore_eos=True)
            requests.append((prompt, params))
        seqs, scheduler = run_engine(
            config, requests, page_size=page_size, num_pages=num_pages,
            prefix_caching=prefix_caching,
        )  # fmt: skip
        num_preempting += scheduler.num_preemptions > 0
        num_bursting += scheduler.num_bursts > 0
        num_hitting += scheduler.kv_cache.num_hits > 0
        for i, (prompt, params) in enumerate(requests):
            expected = reference_outputs(prompt, params, max_model_len)
            assert seqs[f"req-{i}"].output_token_ids == expected
    assert num_preempting >= 30 and num_bursting >= 30
    assert (num_hitting >= 10) if prefix_caching else num_hitting == 0
