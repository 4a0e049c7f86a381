"""Async scheduling (``paged_jax.stepper``: step n + 1 planned and packed while the device runs
step n, its placeholder inputs fed on the device) gives exactly the outputs of the synchronous
loop: tokens, logprobs, finish and stop reasons, on a real (random) model with a pool small
enough to preempt, bursts on and off, and no compile after warmup. The host-engine fuzz
(``test_fuzz_engine``) draws the setting per example; the SmolLM2 grammar case is in
``test_structured_outputs``.
"""

from __future__ import annotations

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.engine.plan import StepPlan, feed_rows
from paged_jax.runtime.inflight import source_rows

TINY = dict(
    dtype="float32",
    num_pages=40,  # 40 x 8 tokens: the workload below preempts
    page_size=8,
    max_model_len=160,
    max_num_seqs=8,
    max_num_batched_tokens=32,
    warmup_logprobs=True,  # the workload asks for logprobs and prompt logprobs
    warmup_progress=False,
)


def workload(seed: int):
    rng = np.random.default_rng(seed)
    prompts, params = [], []
    for i in range(24):
        prompts.append(rng.integers(2, 500, int(rng.integers(1, 60))).tolist())
        kind = i % 6
        common = dict(max_tokens=int(rng.integers(1, 40)), detokenize=False)
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, **common))
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.8, seed=i, **common))
        elif kind == 2:  # stop ids: some end early
            stop = rng.integers(2, 500, 40).tolist()
            params.append(SamplingParams(temperature=1.0, stop_token_ids=stop, **common))
        elif kind == 3:
            common["max_tokens"] += 3
            params.append(SamplingParams(temperature=0.7, logprobs=2, min_tokens=3, **common))
        elif kind == 4:
            params.append(SamplingParams(temperature=0.8, n=2, seed=i, **common))
        else:
            params.append(SamplingParams(temperature=0.0, prompt_logprobs=1, **common))
    return prompts, params


def summary(outputs):
    """Everything exact but logprob values (the batch around a row differs between the two
    loops, and XLA's sums may then differ in the last bit: those go to ``values``)."""
    exact, values = [], []

    def split(entries):
        if entries is None:
            return None
        keys = [None if e is None else [(t, lp.rank) for t, lp in e.items()] for e in entries]
        values.extend(lp.logprob for e in entries if e is not None for lp in e.values())
        return keys

    for o in outputs:
        exact.append((
            [c.token_ids for c in o.outputs],
            [c.finish_reason for c in o.outputs],
            [c.stop_reason for c in o.outputs],
            [split(c.logprobs) for c in o.outputs],
            split(o.prompt_logprobs),
        ))  # fmt: skip
    return exact, np.asarray(values)


def assert_same(got, want):
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_async_scheduling_gives_the_synchronous_outputs(decode_steps):
    prompts, params = workload(decode_steps)
    results = {}
    for on in (False, True):
        with LLM("random:tiny", async_scheduling=on, decode_steps=decode_steps, **TINY) as llm:
            results[on] = summary(llm.generate(prompts, params, use_tqdm=False))
            stats = llm.stats()
            assert stats["compiles_after_warmup"] == 0
            assert stats["preemptions"] > 0
            assert llm.kv_cache.num_used_pages == 0  # every page back, nothing in flight
            assert not llm._driver.stepper.in_flight
            assert (llm._driver.stepper.num_pipelined > 0) == on
            if on:  # overlapped: a bound on the device's wait for the host, per record
                assert all(r.idle_s >= 0 for r in llm.timeline)
    assert_same(results[True], results[False])


def test_abandoned_generator_leaves_nothing_in_flight():
    prompts, params = workload(7)
    done = {}
    for on in (False, True):  # the same calls (request ids seed the unseeded requests)
        with LLM("random:tiny", async_scheduling=on, **TINY) as llm:
            it = llm.generate_as_completed(prompts, params, use_tqdm=False)
            next(it)
            it.close()  # aborts the rest (async: while a step is in flight)
            assert not llm._driver.stepper.in_flight
            assert llm.kv_cache.num_used_pages == 0
            done[on] = summary(llm.generate(prompts[:3], params[:3], use_tqdm=False))
    assert_same(done[True], done[False])


def test_feed_rows_point_at_the_step_in_flight():
    class Seq:
        def __init__(self, seq_id):
            self.seq_id = seq_id

    def item(seq_id, tokens):
        from paged_jax.engine.plan import ScheduledSeq

        return ScheduledSeq(Seq(seq_id), 0, len(tokens), True, tuple(tokens), (1,), 0, None, 0, 1)

    previous = StepPlan((item(5, [3, 4]), item(6, [-1]), item(7, [9])))
    plan = StepPlan((item(7, [-1]), item(8, [1, 2, 3]), item(6, [-1])))
    rows = feed_rows(plan, previous)
    assert rows == (2, -1, 1)
    assert feed_rows(plan, None) == ()
    cu_q_lens = np.array([0, 1, 4, 5, 5], np.int32)
    assert source_rows(cu_q_lens, rows, 8).tolist() == [2, -1, -1, -1, 1, -1, -1, -1]
