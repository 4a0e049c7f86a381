"""End-to-end host tests: scheduler + pack + a fake model that reads its "KV" (token ids)
through the packed slot_mapping and page tables, so wrong pages or slots give wrong tokens."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from paged_jax.engine.page_allocator import NULL_PAGE
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
    eos_ids=(),
    max_steps: int = 100_000,
) -> tuple[dict[str, Sequence], Scheduler]:
    """Drive schedule -> pack -> fake model -> update until every request finishes."""
    scheduler = Scheduler(config, eos_token_ids=eos_ids)
    buckets = Buckets.create(config.max_num_batched_tokens, config.max_num_seqs)
    page_size = config.page_size
    cache = np.full(config.num_pages * page_size, -1, np.int64)  # token "KV" per slot
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
            max_pages_per_seq=config.max_pages_per_seq,
        )
        num_real = int(inputs.cu_q_lens[plan.num_seqs])
        assert (inputs.slot_mapping[:num_real] // page_size != NULL_PAGE).all()
        assert (inputs.slot_mapping[num_real:] // page_size == NULL_PAGE).all()
        if plan.num_steps:
            scheduler.update(plan, run_burst(plan, inputs, cache, page_size))
            num_bursts += 1
            continue
        cache[inputs.slot_mapping] = inputs.token_ids
        sampled = []
        for row in range(plan.num_seqs):
            kv_len = int(inputs.kv_lens[row])
            positions = np.arange(kv_len)
            slots = inputs.page_tables[row, positions // page_size] * page_size
            sampled.append(fake_next_token(cache[slots + positions % page_size]))
        scheduler.update(plan, sampled)
    else:
        raise AssertionError("engine made no progress")
    assert scheduler.allocator.num_free_pages == config.num_pages - 1
    assert scheduler.allocator.num_used_pages == 0
    assert all(seq.is_finished and not seq.page_ids for seq in seqs.values())
    assert num_bursts == 0 or config.decode_steps > 1
    scheduler.num_bursts = num_bursts  # for the tests' own checks
    return seqs, scheduler


def run_burst(plan, inputs, cache: np.ndarray, page_size: int) -> list[list[int]]:
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


def test_tiny_pool_and_budget_match_huge_pool_and_preempt():
    requests = make_requests(seed=0, num_requests=6, max_prompt=20, max_tokens=20)
    huge = SchedulerConfig(
        max_num_seqs=16, max_num_batched_tokens=512, max_model_len=48, page_size=4, num_pages=200
    )
    tiny = SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=5, max_model_len=48, page_size=4, num_pages=13
    )
    huge_seqs, huge_sched = run_engine(huge, requests)
    tiny_seqs, tiny_sched = run_engine(tiny, requests)
    assert huge_sched.num_preemptions == 0
    assert tiny_sched.num_preemptions > 0
    assert any(seq.num_preemptions > 0 for seq in tiny_seqs.values())
    for request_id, seq in huge_seqs.items():
        prompt, params = requests[int(request_id.split("-")[1])]
        expected = reference_outputs(prompt, params, huge.max_model_len)
        assert seq.output_token_ids == expected
        assert tiny_seqs[request_id].output_token_ids == expected
        assert tiny_seqs[request_id].finish_reason == seq.finish_reason == "length"


def test_single_request_filling_the_pool_finishes():
    config = SchedulerConfig(
        max_num_seqs=2, max_num_batched_tokens=3, max_model_len=16, page_size=4, num_pages=5
    )
    prompt = list(range(10))
    params = SamplingParams(max_tokens=100, ignore_eos=True)
    seqs, _ = run_engine(config, [(prompt, params), (prompt[:3], params)])
    assert seqs["req-0"].output_token_ids == reference_outputs(prompt, params, 16)
    assert seqs["req-0"].num_tokens == 16 and seqs["req-0"].finish_reason == "length"
    assert seqs["req-1"].num_tokens == 16


def test_eos_and_min_tokens_end_to_end():
    requests = make_requests(seed=1, num_requests=8, max_prompt=10, max_tokens=30)
    requests = [
        (p, SamplingParams(max_tokens=s.max_tokens, min_tokens=i % 3, stop_token_ids=[5]))
        for i, (p, s) in enumerate(requests)
    ]
    eos_ids = {EOS, 11, 12, 13}
    for decode_steps in (1, 8):
        config = SchedulerConfig(
            max_num_seqs=3, max_num_batched_tokens=7, max_model_len=40, page_size=2, num_pages=30,
            decode_steps=decode_steps,
        )  # fmt: skip
        seqs, scheduler = run_engine(config, requests, eos_ids=eos_ids)
        assert (scheduler.num_bursts > 0) == (decode_steps > 1)
        for i, (prompt, params) in enumerate(requests):
            expected = reference_outputs(prompt, params, 40, eos_ids)
            assert seqs[f"req-{i}"].output_token_ids == expected


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.sampled_from([1, 2, 3, 4, 8, 16]),
    max_model_len=st.integers(4, 48),
    extra_pages=st.integers(0, 12),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 6),
    reserve_full=st.booleans(),
    decode_steps=st.sampled_from([1, 2, 3, 8]),
    workload=st.lists(
        st.tuples(st.integers(1, 48), st.integers(1, 24), st.integers(0, 2**31)),
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
    reserve_full,
    decode_steps,
    workload,
):
    max_pages_per_seq = -(-max_model_len // page_size)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        page_size=page_size,
        num_pages=1 + max_pages_per_seq + extra_pages,
        reserve_full=reserve_full,
        decode_steps=decode_steps,
    )
    requests = []
    for prompt_len, max_tokens, seed in workload:
        rng = np.random.default_rng(seed)
        prompt = rng.integers(0, VOCAB, size=min(prompt_len, max_model_len)).tolist()
        requests.append((prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
    seqs, scheduler = run_engine(config, requests)
    for i, (prompt, params) in enumerate(requests):
        seq = seqs[f"req-{i}"]
        assert seq.output_token_ids == reference_outputs(prompt, params, max_model_len)
        assert seq.prompt_token_ids == prompt
        assert seq.first_token_time is not None and seq.finished_time is not None
    if reserve_full:
        assert scheduler.num_preemptions == 0


def test_seeded_sweep_with_preemptions():
    """Many random tight-pool workloads (about a third preempt): outputs never change."""
    rng = np.random.default_rng(1234)
    num_preempting = num_bursting = 0
    for _ in range(150):
        page_size = int(rng.choice([1, 2, 4, 8]))
        max_model_len = int(rng.integers(4, 49))
        max_pages_per_seq = -(-max_model_len // page_size)
        config = SchedulerConfig(
            max_num_seqs=int(rng.integers(1, 7)),
            max_num_batched_tokens=int(rng.integers(1, 65)),
            max_model_len=max_model_len,
            page_size=page_size,
            num_pages=1 + max_pages_per_seq + int(rng.integers(0, 13)),
            decode_steps=int(rng.choice([1, 4, 8])),
        )
        requests = []
        for _ in range(int(rng.integers(1, 9))):
            prompt_len = min(int(rng.integers(1, 49)), max_model_len)
            prompt = rng.integers(0, VOCAB, size=prompt_len).tolist()
            params = SamplingParams(max_tokens=int(rng.integers(1, 25)), ignore_eos=True)
            requests.append((prompt, params))
        seqs, scheduler = run_engine(config, requests)
        num_preempting += scheduler.num_preemptions > 0
        num_bursting += scheduler.num_bursts > 0
        for i, (prompt, params) in enumerate(requests):
            expected = reference_outputs(prompt, params, max_model_len)
            assert seqs[f"req-{i}"].output_token_ids == expected
    assert num_preempting >= 30 and num_bursting >= 30
