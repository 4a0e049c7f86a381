from __future__ import annotations

import dataclasses
from array import array

import numpy as np
import pytest

from paged_jax.engine.kv_cache import NULL_PAGE
from paged_jax.engine.plan import ScheduledSeq, StepPlan
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.sequence import Sequence
from paged_jax.runtime.buckets import Buckets, pick_bucket, power_of_two_buckets
from paged_jax.runtime.pack import pack

PAGE_SIZE = 4


def item(seq: Sequence, start: int, num_new: int, page_ids, sample: bool = True) -> ScheduledSeq:
    end = start + num_new
    targets = ()
    if seq.sampling_params.prompt_logprobs is not None:  # as the scheduler snapshots them
        targets = tuple(seq.token_ids[start + 1 : min(end, seq.num_prompt_tokens - 1) + 1])
    return ScheduledSeq(
        seq=seq,
        start_position=start,
        num_new_tokens=num_new,
        sample=sample,
        token_ids=tuple(seq.token_ids[start:end]),
        page_ids=tuple(page_ids),
        sample_position=seq.num_output_tokens,
        params=seq.sampling_params,
        seed=seq.seed,
        num_prompt_tokens=seq.num_prompt_tokens,
        prompt_targets=targets,
    )


@pytest.fixture
def plan() -> StepPlan:
    decode = Sequence("dec", [1, 2, 3, 4, 5], SamplingParams(temperature=0.5, top_k=5, seed=42))
    decode.append_token(6)
    decode.append_token(9)  # 7 tokens, 6 cached: decode position 6
    prefill = Sequence("pre", range(100, 110), SamplingParams(top_p=0.9, min_p=0.1))
    return StepPlan(
        (
            item(decode, 6, 1, [7, 3]),
            item(prefill, 0, 6, [5, 2], sample=False),  # chunk of 6 of 10 tokens
        )
    )


def test_pack_values(plan):
    inputs = pack(
        plan, num_tokens_bucket=16, num_seqs_bucket=8, page_size=PAGE_SIZE, max_pages_per_seq=3
    )
    assert inputs.token_ids.tolist()[:7] == [9, 100, 101, 102, 103, 104, 105]
    assert inputs.token_ids.tolist()[7:] == [0] * 9
    assert inputs.positions.tolist()[:7] == [6, 0, 1, 2, 3, 4, 5]
    # decode pos 6 -> page 3 offset 2; prefill pos 0-3 -> page 5, pos 4-5 -> page 2
    assert inputs.slot_mapping.tolist()[:7] == [14, 20, 21, 22, 23, 8, 9]
    assert (inputs.slot_mapping[7:] // PAGE_SIZE == NULL_PAGE).all()
    assert inputs.cu_q_lens.tolist() == [0, 1, 7, 7, 7, 7, 7, 7, 7]
    assert inputs.kv_lens.tolist() == [7, 6, 0, 0, 0, 0, 0, 0]
    assert inputs.page_tables.shape == (8, 3)
    assert inputs.page_tables[:2].tolist() == [[7, 3, NULL_PAGE], [5, 2, NULL_PAGE]]
    assert (inputs.page_tables[2:] == NULL_PAGE).all()
    assert inputs.num_seqs.tolist() == [2]
    assert inputs.logits_indices.tolist() == [0, 6, 0, 0, 0, 0, 0, 0]
    assert inputs.do_sample.tolist() == [True, False] + [False] * 6
    assert inputs.sample_positions.tolist()[:2] == [2, 0]
    np.testing.assert_allclose(inputs.temperature[:2], [0.5, 1.0])
    assert inputs.top_k.tolist()[:2] == [5, -1]
    np.testing.assert_allclose(inputs.top_p[:2], [1.0, 0.9])
    np.testing.assert_allclose(inputs.min_p[:2], [0.0, 0.1])
    assert inputs.seeds[0] == 42
    assert inputs.seeds[1] == plan.scheduled[1].seed  # unseeded: the request's own seed
    assert not inputs.target_ids.any()  # no prompt_logprobs asked for
    assert inputs.min_tokens.tolist() == [0] * 8
    assert inputs.burst_steps.tolist() == [1, 1] + [0] * 6  # one step; padding rows 0


def test_pack_takes_the_managers_i32_rows(plan):
    """Page rows as the KV cache manager snapshots them (array("i"), joined as one buffer) pack
    exactly as tuples do; a burst's per-row steps travel too."""
    shape = dict(num_tokens_bucket=16, num_seqs_bucket=8, page_size=PAGE_SIZE, max_pages_per_seq=3)
    rows = [dataclasses.replace(i, page_ids=array("i", i.page_ids)) for i in plan.scheduled]
    want = pack(plan, **shape)
    got = pack(StepPlan(tuple(rows)), **shape)
    for f in dataclasses.fields(want):
        np.testing.assert_array_equal(getattr(got, f.name), getattr(want, f.name), f.name)
    dec = plan.scheduled[0]
    burst = pack(StepPlan((dec,), num_steps=(3,)), **shape)
    assert burst.burst_steps.tolist() == [3] + [0] * 7


def test_pack_dtypes_and_shapes(plan):
    inputs = pack(
        plan, num_tokens_bucket=16, num_seqs_bucket=8, page_size=PAGE_SIZE, max_pages_per_seq=3
    )
    for name in ("token_ids", "positions", "slot_mapping"):
        assert getattr(inputs, name).shape == (16,) and getattr(inputs, name).dtype == np.int32
    for name in ("kv_lens", "logits_indices", "top_k", "sample_positions"):
        assert getattr(inputs, name).shape == (8,) and getattr(inputs, name).dtype == np.int32
    for name in ("temperature", "top_p", "min_p"):
        assert getattr(inputs, name).dtype == np.float32
    assert inputs.cu_q_lens.shape == (9,) and inputs.seeds.dtype == np.uint32
    assert inputs.do_sample.dtype == np.bool_ and inputs.page_tables.dtype == np.int32


def test_unseeded_requests_get_a_seed_from_their_id():
    a = Sequence("same-id", [1], SamplingParams())
    b = Sequence("same-id", [2, 3], SamplingParams())
    c = Sequence("other-id", [1], SamplingParams())
    assert a.seed == b.seed != c.seed
    assert Sequence("same-id", [1], SamplingParams(), default_seed=1).seed != a.seed
    assert Sequence("x", [1], SamplingParams(seed=2**32 - 1)).seed == 2**32 - 1
    for seed in (-1, 2**32, 2**32 + 5):  # they would wrap onto another seed's stream
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)
    assert Sequence("x", [1], SamplingParams(seed=7), default_seed=1).seed == 7
    assert all(0 <= s.seed < 2**32 for s in (a, b, c))


def test_pack_reads_the_snapshot_not_the_live_sequence(plan):
    """pack must take everything from the ScheduledSeq fields: changing the live sequence
    after scheduling (as Scheduler.update does) must not change the packed arrays."""
    before = pack(
        plan, num_tokens_bucket=16, num_seqs_bucket=8, page_size=PAGE_SIZE, max_pages_per_seq=3
    )
    for i in plan.scheduled:
        i.seq.append_token(55)
        i.seq.num_computed_tokens += 3
        i.seq.sampling_params = SamplingParams(temperature=0.0, seed=1, min_tokens=9)
    after = pack(
        plan, num_tokens_bucket=16, num_seqs_bucket=8, page_size=PAGE_SIZE, max_pages_per_seq=3
    )
    for field in dataclasses.fields(before):
        np.testing.assert_array_equal(
            getattr(after, field.name), getattr(before, field.name), err_msg=field.name
        )


def test_pack_writes_prompt_targets():
    """With prompt_logprobs, each new token that has a next prompt token is scored on it."""
    params = SamplingParams(prompt_logprobs=1)
    seq = Sequence("p", range(100, 110), params)
    first, last = item(seq, 0, 6, [5, 2], sample=False), item(seq, 6, 4, [5, 2, 4])
    assert first.prompt_targets == tuple(range(101, 107))
    assert last.prompt_targets == (107, 108, 109)  # the last prompt token has none
    inputs = pack(
        StepPlan((first, last)),
        num_tokens_bucket=16, num_seqs_bucket=8, page_size=PAGE_SIZE, max_pages_per_seq=3,
    )  # fmt: skip
    assert inputs.target_ids.tolist() == [*range(101, 107), 107, 108, 109, 0] + [0] * 6


def test_pack_rejects_too_small_buckets(plan):
    with pytest.raises(ValueError, match="num_tokens_bucket"):
        pack(plan, num_tokens_bucket=4, num_seqs_bucket=8, page_size=4, max_pages_per_seq=3)
    with pytest.raises(ValueError, match="num_seqs_bucket"):
        pack(plan, num_tokens_bucket=16, num_seqs_bucket=1, page_size=4, max_pages_per_seq=3)
    with pytest.raises(ValueError, match="max_pages_per_seq"):
        pack(plan, num_tokens_bucket=16, num_seqs_bucket=8, page_size=4, max_pages_per_seq=1)


def test_pack_full_bucket_has_no_padding(plan):
    inputs = pack(
        plan, num_tokens_bucket=7, num_seqs_bucket=2, page_size=PAGE_SIZE, max_pages_per_seq=2
    )
    assert inputs.cu_q_lens.tolist() == [0, 1, 7] and inputs.logits_indices.tolist() == [0, 6]


def test_buckets():
    assert power_of_two_buckets(100, 16) == (16, 32, 64, 100)
    assert power_of_two_buckets(64, 16) == (16, 32, 64)
    assert power_of_two_buckets(10, 16) == (10,)
    buckets = Buckets.create(max_num_batched_tokens=100, max_num_seqs=20)
    assert buckets.token_buckets == (16, 32, 64, 100)
    assert buckets.seq_buckets == (8, 16, 20)
    assert buckets.pick_bucket(1, 1) == (16, 16)
    assert buckets.pick_bucket(16, 9) == (16, 16)
    assert buckets.pick_bucket(17, 16) == (32, 20)
    assert buckets.pick_bucket(65, 17) == (100, 20)
    assert buckets.pick_bucket(100, 20) == (100, 20)
    assert pick_bucket(33, 3, max_num_batched_tokens=100, max_num_seqs=20) == (64, 20)
    assert buckets.reachable() == [(16, 16), (32, 20), (64, 20), (100, 20)]
    with pytest.raises(ValueError, match="num_tokens"):
        buckets.pick_bucket(101, 1)
    with pytest.raises(ValueError, match="num_seqs"):
        buckets.pick_bucket(8, 21)


def test_one_reachable_bucket_per_token_bucket():
    buckets = Buckets.create(max_num_batched_tokens=64, max_num_seqs=64)
    reachable = buckets.reachable()
    assert reachable == [(16, 16), (32, 32), (64, 64)]
    for num_tokens in range(1, 65):
        for num_seqs in range(1, num_tokens + 1):
            assert buckets.pick_bucket(num_tokens, num_seqs) in reachable


def test_pack_empty_plan_is_all_padding():
    inputs = pack(
        StepPlan(()), num_tokens_bucket=16, num_seqs_bucket=8, page_size=4, max_pages_per_seq=2
    )
    assert inputs.num_seqs.tolist() == [0] and (inputs.cu_q_lens == 0).all()
    assert (inputs.slot_mapping // 4 == NULL_PAGE).all() and not inputs.do_sample.any()
    assert (inputs.page_tables == NULL_PAGE).all() and (inputs.kv_lens == 0).all()
