"""Decode bursts on the model: the device-side `advance` against `pack`, and whole runs whose
tokens must not depend on decode_steps (random:tiny in f32 on CPU)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.engine.plan import ScheduledSeq, StepPlan
from paged_jax.engine.sequence import Sequence
from paged_jax.runtime.burst import advance
from paged_jax.runtime.folded import Folded
from paged_jax.runtime.pack import pack

PAGE = 4
OPTS = dict(
    dtype="float32", page_size=PAGE, max_model_len=80, max_num_seqs=8, max_num_batched_tokens=32
)


def decode_item(seq: Sequence, num_pages: int) -> ScheduledSeq:
    return ScheduledSeq(
        seq=seq,
        start_position=seq.num_tokens - 1,
        num_new_tokens=1,
        sample=True,
        token_ids=(seq.last_token_id,),
        page_ids=tuple(range(1 + 10 * seq.seq_id % 50, 1 + 10 * seq.seq_id % 50 + num_pages)),
        sample_position=seq.num_output_tokens,
        params=seq.sampling_params,
        seed=seq.seed,
        num_prompt_tokens=seq.num_prompt_tokens,
    )


def test_advance_equals_packing_the_next_step():
    seqs = [
        Sequence("a", [1, 2, 3], SamplingParams(min_tokens=3)),
        Sequence("b", list(range(9)), SamplingParams()),
        Sequence("c", [5] * 4, SamplingParams(seed=3, temperature=0.5)),
    ]
    for s in seqs:
        s.append_token(7)
    num_steps = [3, 1, 2]
    items = [decode_item(s, 4) for s in seqs]
    shape = dict(num_tokens_bucket=16, num_seqs_bucket=8, page_size=PAGE, max_pages_per_seq=6)
    first = pack(StepPlan(tuple(items), num_steps=tuple(num_steps)), **shape)
    inputs = {f.name: getattr(first, f.name) for f in dataclasses.fields(first)}
    sampled = np.array([11, 12, 13, 0, 0, 0, 0, 0], np.int32)
    # each row's steps in the burst and min_tokens travel in the packed inputs
    np.testing.assert_array_equal(inputs["burst_steps"], num_steps + [0] * 5)
    np.testing.assert_array_equal(inputs["min_tokens"], [3, 0, 0] + [0] * 5)
    nxt, step = advance(inputs, sampled, np.int32(0), page_size=PAGE)
    assert int(step) == 1
    # The same step packed on the host: a and c move on with their sampled token, b idles.
    for s, token in zip(seqs, (11, 12, 13), strict=True):
        s.append_token(token)
    live = [decode_item(seqs[0], 4), decode_item(seqs[2], 4)]
    expected = pack(StepPlan(tuple(live)), **shape)
    for name in ("token_ids", "positions", "slot_mapping"):
        got = np.asarray(nxt[name])
        np.testing.assert_array_equal(got[[0, 2]], getattr(expected, name)[:2], err_msg=name)
    for name in ("kv_lens", "sample_positions", "suppress_eos"):
        got = np.asarray(nxt[name])
        np.testing.assert_array_equal(got[[0, 2]], getattr(expected, name)[:2], err_msg=name)
    # The idle row keeps its token and position and writes into NULL_PAGE.
    assert int(nxt["token_ids"][1]) == first.token_ids[1]
    assert int(nxt["kv_lens"][1]) == first.kv_lens[1] and int(nxt["slot_mapping"][1]) // PAGE == 0
    assert bool(nxt["suppress_eos"][0]) and not bool(nxt["suppress_eos"][2])
    np.testing.assert_array_equal(np.asarray(nxt["slot_mapping"][3:]) // PAGE, 0)


def _run(decode_steps: int, num_pages: int, prompts, params, fused=False, fold=False):
    # the fused run also sends its step inputs through pinned host memory (runtime.wire)
    llm = LLM("random:tiny", num_pages=num_pages, decode_steps=decode_steps,
              fused_bursts=fused, pinned_inputs=fused, fold_inputs=fold, **OPTS)  # fmt: skip
    assert llm._driver.runner.wire_memory == ("pinned_host" if fused else "device")
    kinds = {key.kind for key in llm._driver.runner._executables}
    assert ("unpack" in kinds) != fold and any(isinstance(k, Folded) for k in kinds) == fold
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.stats()
    stats["fused_bursts"] = llm._driver.runner.num_fused_bursts
    assert stats["compiles_after_warmup"] == 0
    kv = llm.kv_cache
    assert kv.num_used_pages == 0 and kv.num_free_pages == num_pages - 1
    kv.check()
    bursts = sum(r.num_steps > 1 for r in llm.timeline)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], stats, bursts


@pytest.mark.parametrize("num_pages", [200, 22])  # roomy, and tight enough to preempt
def test_outputs_do_not_depend_on_decode_steps(num_pages):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 512, int(n)).tolist() for n in rng.integers(2, 30, 10)]
    reference, _, _ = _run(
        1,
        200,
        prompts,
        [SamplingParams(max_tokens=40, ignore_eos=True, detokenize=False, temperature=0.0)]
        * len(prompts),
    )
    # Stop ids that the greedy runs meet partway, so bursts must drop the tokens after them.
    params = []
    for i, (tokens, _) in enumerate(reference):
        params.append(SamplingParams(
            max_tokens=40 if i % 2 else int(rng.integers(4, 40)), min_tokens=i % 4,
            ignore_eos=True,
            stop_token_ids=[tokens[5 + i % 7]], detokenize=False,
            temperature=0.0 if i % 2 else 0.8, top_p=0.9, seed=i,
        ))  # fmt: skip
    single, single_stats, single_bursts = _run(1, num_pages, prompts, params)
    burst, burst_stats, num_bursts = _run(8, num_pages, prompts, params)
    assert burst == single
    assert single_bursts == 0 and num_bursts > 0
    # the same bursts, those of all 8 steps as one executable each (runtime.burst.make_fused),
    # inputs through pinned host memory, unpacked by the step executables (runtime.folded)
    fused, fused_stats, _ = _run(8, num_pages, prompts, params, fused=True, fold=True)
    assert fused == single
    # folded steps whose bursts go on step by step (sampled rows fed from widened samples)
    folded, _, folded_bursts = _run(8, num_pages, prompts, params, fold=True)
    assert folded == single and folded_bursts > 0
    assert burst_stats["fused_bursts"] == 0 and fused_stats["fused_bursts"] > 0
    assert {reason for _, reason in single} == {"stop", "length"}
    assert burst_stats["output_tokens"] == single_stats["output_tokens"]
    if num_pages == 22:
        assert single_stats["preemptions"] > 0
