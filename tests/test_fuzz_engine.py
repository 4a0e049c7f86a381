"""Fuzz of the whole host engine: the real driver, scheduler, KV cache manager, decode bursts,
beam groups and stop handling, over a fake deterministic model that reads its "K/V" back
through the page tables (``tests/fake_engine.py``).

Each example is one engine (page size, pool from tiny to ample, budgets, bursts, caching) and a
workload of random requests arriving over time: shared prefixes, n > 1, beams, seeds,
temperatures, stop ids and strings, min/max tokens, logprobs and prompt logprobs, aborts.
After every step the KV cache manager's invariants hold (no page leaked or owned twice, counts
equal the page tables' references); at the end every page is back, every sequence finished
exactly once, and every request's output equals the oracle (``fake_engine.reference``: the
same model on the true tokens, no pages) and the same request run alone on a roomy engine.

Hypothesis draws the workloads (one fixed seed per pool: the same examples every CI run) and
shrinks a failure to a small one. The four pool sizes together run more than 10,000 requests.
"""

from __future__ import annotations

import collections
import itertools
import os

import numpy as np
import pytest
from fake_engine import (
    ALPHABET,
    VOCAB,
    CharTokenizer,
    make_driver,
    reference,
    reference_prompt_logprobs,
)
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from paged_jax.engine.beam import BeamSearchParams
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.scheduler import SchedulerConfig
from paged_jax.request import BeamRequest

# Extra pages beyond the one max_model_len sequence every pool must hold.
POOLS = {"tiny": (0, 1), "small": (2, 6), "medium": (8, 24), "ample": (400, 400)}
SEEDS = {"tiny": 17_1, "small": 17_2, "medium": 17_3, "ample": 17_4}  # one fixed seed per pool
MIN_REQUESTS_PER_POOL = 2_600  # 4 pools: > 10,000 requests per run
EXAMPLES_PER_POOL = int(os.environ.get("FUZZ_EXAMPLES", 45))
MAX_STEPS = 20_000


@st.composite
def request_spec(draw):
    kind = draw(st.sampled_from(["one", "one", "one", "n", "beam"]))
    spec = {
        "kind": kind,
        "n": 1,
        "logprobs": None,
        "prompt_logprobs": None,
        "prefix": draw(st.sampled_from([-1, -1, 0, 1, 2])),
        "tail_len": draw(st.integers(0, 70)),
        "tail_seed": draw(st.integers(0, 2**16)),
        "max_tokens": draw(st.integers(1, 12)),
        "arrival": draw(st.integers(0, 40)),
        "abort_at": draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 40))),
        "ignore_eos": draw(st.booleans()),
    }
    if kind == "beam":
        spec["beam_width"] = draw(st.integers(1, 3))
        spec["length_penalty"] = draw(st.sampled_from([0.0, 1.0, 2.0]))
        spec["early_stopping"] = draw(st.sampled_from([True, False, "never"]))
        return spec
    spec.update(
        n=draw(st.integers(2, 3)) if kind == "n" else 1,
        min_tokens=draw(st.sampled_from([0, 0, 1, 3, 8])),
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0])),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))),
        stop_token_ids=draw(st.one_of(st.none(), st.lists(st.integers(0, VOCAB - 1), max_size=2))),
        stop=draw(
            st.one_of(
                st.none(),
                st.lists(st.text(ALPHABET[:6], min_size=1, max_size=2), min_size=1, max_size=2),
            )  # fmt: skip
        ),
        logprobs=draw(st.one_of(st.none(), st.none(), st.integers(0, 3))),
        prompt_logprobs=draw(st.sampled_from([None, None, None, None, 0, 2])),
        skip_special_tokens=draw(st.booleans()),
        cache_salt=draw(st.sampled_from([None, None, None, "tenant"])),
    )
    return spec


@st.composite
def workload(draw, pool: str):
    lo, hi = POOLS[pool]
    page_size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    max_model_len = draw(st.integers(4, 64))
    config = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(1, 48)),
        max_model_len=max_model_len,
        decode_steps=draw(st.sampled_from([1, 4, 8])),
    )
    num_pages = 1 + -(-max_model_len // page_size) + draw(st.integers(lo, hi))
    caching = draw(st.sampled_from([True, True, False]))
    requests = draw(st.lists(request_spec(), min_size=70, max_size=100))
    if draw(st.booleans()):  # plain requests only: decode bursts need plans without logprobs
        requests = [
            {**r, "kind": "one", "n": 1, "logprobs": None, "prompt_logprobs": None}
            if r["kind"] != "one" or r["logprobs"] is not None or r["prompt_logprobs"] is not None
            else r
            for r in requests
            if r["kind"] != "beam"
        ]
    async_scheduling = draw(st.booleans())  # plan step n + 1 while step n is in flight
    return config, page_size, num_pages, caching, requests, async_scheduling


def beam_pages(num_prompt_tokens, max_tokens, width, page_size, max_model_len) -> int:
    """The most pages ``width`` beams may hold at once (all diverged right after the prompt)."""
    end = min(num_prompt_tokens + max_tokens, max_model_len)
    shared = (num_prompt_tokens - 1) // page_size
    return shared + width * (-(-max(num_prompt_tokens, end - 1) // page_size) - shared)


def build(spec: dict, prefixes: list[list[int]], max_model_len: int, page_size: int,
          num_pages: int):  # fmt: skip
    """The prompt and params of one spec (clipped to fit max_model_len; beams also to fit the
    pool at full divergence: below that the engine refuses them, see
    ``Scheduler.check_group_fits``)."""
    rng = np.random.default_rng(spec["tail_seed"])
    head = prefixes[spec["prefix"]] if spec["prefix"] >= 0 else []
    prompt = (head + rng.integers(0, VOCAB, size=spec["tail_len"]).tolist()) or [5]
    if spec["kind"] == "beam":
        max_tokens = min(spec["max_tokens"], max_model_len - 1)
        prompt = prompt[: max_model_len - max_tokens]
        width = spec["beam_width"]
        while max_tokens > 1 and beam_pages(len(prompt), max_tokens, width, page_size,
                                            max_model_len) > num_pages - 1:  # fmt: skip
            max_tokens -= 1
        params = BeamSearchParams(
            beam_width=spec["beam_width"],
            max_tokens=max_tokens,
            length_penalty=spec["length_penalty"],
            early_stopping=spec["early_stopping"],
            ignore_eos=spec["ignore_eos"],
        )
        return prompt, params
    fields = {k: spec[k] for k in ("n", "temperature", "seed", "stop_token_ids", "stop",
                                   "logprobs", "prompt_logprobs", "skip_special_tokens",
                                   "cache_salt", "ignore_eos", "max_tokens")}  # fmt: skip
    fields["min_tokens"] = min(spec["min_tokens"], spec["max_tokens"])
    return prompt[:max_model_len], SamplingParams(**fields)


def run_alone(prompt, params, request_id: str, max_model_len: int):
    """The request alone on a roomy engine (another page size, no caching, no bursts)."""
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64,
                             max_model_len=max_model_len)  # fmt: skip
    driver = make_driver(config, num_pages=1 + 16 * -(-max_model_len // 4), page_size=4,
                         enable_prefix_caching=False, async_scheduling=False)  # fmt: skip
    driver._request_ids = itertools.count(int(request_id))  # the same id: the same default seed
    beam = isinstance(params, BeamSearchParams)
    request = driver.make_beam_request(prompt, params) if beam else driver.make_request(
        prompt, params)  # fmt: skip
    driver.add(request)
    for _ in driver.run_until_done([request], use_tqdm=False):
        pass
    return request.output(driver._tokenizer) if beam else request.output()


def _values(entries):
    """Logprob entries as {id: logprob} (the fake model's reference keeps only the values)."""
    if entries is None:
        return None
    return [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in entries]


def check_completion(out, want: dict, params: SamplingParams, aborted: bool) -> None:
    got = {k: getattr(out, k) for k in want}
    if "logprobs" in got:
        got["logprobs"] = _values(got["logprobs"])
    if aborted and out.finish_reason == "abort":  # what came out so far is the right start
        n = len(out.token_ids)
        assert out.token_ids == want["token_ids"][:n]
        if params.detokenize:
            text = CharTokenizer().decode(
                out.token_ids, skip_special_tokens=params.skip_special_tokens
            )
            assert out.text == text
        assert out.logprobs is None or _values(out.logprobs) == want["logprobs"][:n]
        return
    assert got == want, (got, want)


def run_workload(
    config, page_size, num_pages, caching, specs, async_scheduling
) -> collections.Counter:
    """Run one example; returns counts of what it exercised."""
    driver = make_driver(config, num_pages=num_pages, page_size=page_size,
                         enable_prefix_caching=caching,
                         async_scheduling=async_scheduling)  # fmt: skip
    scheduler, kv = driver.scheduler, driver.scheduler.kv_cache
    finishes = collections.Counter()
    finish = scheduler._finish

    def finish_once(seq, *args):  # every sequence finishes exactly once
        finishes[seq.seq_id] += 1
        assert finishes[seq.seq_id] == 1, f"{seq!r} finished twice"
        finish(seq, *args)

    scheduler._finish = finish_once
    rng = np.random.default_rng(len(specs))
    prefixes = [rng.integers(0, VOCAB, size=int(rng.integers(1, 40))).tolist() for _ in range(3)]
    pending = sorted(range(len(specs)), key=lambda i: specs[i]["arrival"])
    live: dict[int, tuple] = {}  # spec index -> (prompt, params, request)
    rejected = 0
    for step in range(MAX_STEPS):
        while pending and specs[pending[0]]["arrival"] <= step:
            i = pending.pop(0)
            prompt, params = build(specs[i], prefixes, config.max_model_len, page_size, num_pages)
            beam = isinstance(params, BeamSearchParams)
            group = params.beam_width if beam else params.n
            try:
                req = (driver.make_beam_request if beam else driver.make_request)(prompt, params)
            except ValueError as e:  # a group that cannot run at once is refused up front
                assert ("beam_width=" if beam else "n=") in str(e)
                assert group > config.max_num_seqs or "KV pages" in str(e), e
                rejected += 1
                continue
            driver.add(req)
            live[i] = (prompt, params, req)
        for i, (_, _, req) in live.items():
            if specs[i]["abort_at"] == step:
                driver.abort(req)
        if not pending and driver.num_unfinished == 0:
            break
        if driver.num_unfinished:
            driver.step()
            kv.check()
            assert scheduler.num_running_seqs <= config.max_num_seqs
    else:
        raise AssertionError(f"no end after {MAX_STEPS} steps")
    # Every page back (cached ones count as free), nothing left in flight.
    assert not scheduler.has_unfinished() and driver.num_unfinished == 0
    assert kv.num_used_pages == 0 and kv.num_filled_tokens == 0
    assert kv.num_free_pages == num_pages - 1
    for i, (prompt, params, req) in live.items():
        assert req.is_finished
        aborted = specs[i]["abort_at"] is not None
        if isinstance(req, BeamRequest):
            if not aborted:
                alone = run_alone(prompt, params, req.seq.request_id, config.max_model_len)
                assert req.output(driver._tokenizer) == alone
            continue
        out = req.output()
        assert all(f == 1 for f in (finishes[s.seq_id] for s in req.seqs))
        if not aborted:
            assert all(c.finish_reason in ("stop", "length") for c in out.outputs)
            alone = run_alone(prompt, params, req.seq.request_id, config.max_model_len)
            assert out.outputs == alone.outputs and out.prompt_logprobs == alone.prompt_logprobs
        for c, seq in zip(out.outputs, req.seqs, strict=True):
            want = reference(prompt, params, seq.seed, config.max_model_len)
            check_completion(c, want, params, aborted)
        if params.prompt_logprobs is not None and out.prompt_logprobs is not None:
            if not aborted:
                assert _values(out.prompt_logprobs) == reference_prompt_logprobs(
                    prompt, params.prompt_logprobs
                )
    stops = [c.stop_reason for _, _, r in live.values() if not isinstance(r, BeamRequest)
             for c in r.output().outputs]  # fmt: skip
    return collections.Counter(
        requests=len(specs) - rejected,
        rejected=rejected,
        preemptions=scheduler.num_preemptions,
        bursts=driver.runner.num_bursts,
        copies=driver.runner.num_copies,
        hit_tokens=kv.num_hits,
        beams=sum(isinstance(r, BeamRequest) for _, _, r in live.values()),
        groups=sum(len(r.seqs) > 1 for _, _, r in live.values()),
        aborted=sum(s["abort_at"] is not None for s in specs),
        stop_strings=sum(isinstance(s, str) for s in stops),
        stop_ids=sum(isinstance(s, int) for s in stops),
        sync_examples=int(not async_scheduling),
        pipelined_steps=driver.stepper.num_pipelined,
    )


@pytest.mark.parametrize("pool", list(POOLS))
def test_fuzz_host_engine(pool):
    counts = collections.Counter()

    @seed(SEEDS[pool])
    @settings(max_examples=EXAMPLES_PER_POOL, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(workload(pool))
    def fuzz(case):
        counts.update(run_workload(*case))

    fuzz()
    print(pool, dict(counts))
    assert counts["requests"] >= MIN_REQUESTS_PER_POOL, counts
    # The workloads reach every path they are meant to (else the fuzz proves little).
    for key in ("bursts", "copies", "hit_tokens", "beams", "groups", "aborted", "stop_strings",
                "stop_ids", "sync_examples", "pipelined_steps"):  # fmt: skip
        assert counts[key] > 0, (key, counts)
    if pool == "tiny":  # groups larger than max_num_seqs or the pool are refused up front
        assert counts["rejected"] > 0, counts
    assert (counts["preemptions"] > 0) == (pool != "ample"), counts
