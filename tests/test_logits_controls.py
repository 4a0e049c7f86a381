"""vLLM's logits controls (penalties, logit_bias, allowed_token_ids) against a numpy
re-implementation of vLLM's formulas (``vllm/model_executor/layers/utils.py``
``apply_penalties`` and the V1 sampler's order: allowed-ids mask, logit bias, repetition, then
frequency and presence), on the device function and through the engine.

Engine check: greedy with controls must, at every output position, pick the argmax of the
oracle applied to the reference model's dense logits of the sequence so far (a cache-free
re-run) -- with decode bursts on, so counts inside a burst are exercised, and a batch mixing
every control compiles nothing after warmup.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.model.dense import dense_logits
from paged_jax.runtime.controls import apply_controls
from paged_jax.structured import packed_mask

VOCAB = 512  # random:tiny


def vllm_oracle(logits, prompt, output, params: SamplingParams):
    """One row of logits f32[V] after vLLM's allowed-ids mask, logit bias and penalties."""
    x = np.array(logits, np.float64)
    if params.allowed_token_ids is not None:
        keep = np.zeros(x.shape, bool)
        keep[list(params.allowed_token_ids)] = True
        x[~keep] = -np.inf
    for t, b in (params.logit_bias or {}).items():
        x[t] += b
    counts = np.bincount(np.asarray(output, np.int64), minlength=x.size)[: x.size]
    seen = np.bincount(np.asarray(list(prompt) + list(output), np.int64), minlength=x.size) > 0
    rep = params.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    x -= params.frequency_penalty * counts
    x -= params.presence_penalty * (counts > 0)
    return x


CASES = {
    "none": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, detokenize=False),
    "repetition": SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, detokenize=False, repetition_penalty=1.8
    ),
    "frequency": SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, detokenize=False, frequency_penalty=1.5
    ),
    "presence": SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, detokenize=False, presence_penalty=2.0
    ),
    "repetition<1": SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, detokenize=False, repetition_penalty=0.5
    ),
    "bias": SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        detokenize=False,
        logit_bias={7: 2.5, 300: -100.0, "42": 1.5},
    ),
    "allowed": SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        detokenize=False,
        allowed_token_ids=[3, 9, 27, 81, 243, 500],
    ),
    "all": SamplingParams(
        temperature=0,
        max_tokens=12,
        ignore_eos=True,
        detokenize=False,
        repetition_penalty=1.3,
        frequency_penalty=0.7,
        presence_penalty=-0.5,
        logit_bias={11: 1.0},
        allowed_token_ids=list(range(0, 512, 3)),
    ),
}


def test_device_controls_match_the_oracle():
    """Random logits and token histories behind random page tables, one row per case."""
    rng = np.random.default_rng(0)
    page_size, num_pages, max_pages = 4, 40, 6
    rows = list(CASES.values())
    S = len(rows)
    logits = rng.normal(0, 3, (S, VOCAB)).astype(np.float32)
    token_pages = rng.integers(0, VOCAB, (num_pages, page_size)).astype(np.int32)
    page_tables = np.zeros((S, max_pages), np.int32)
    kv_lens = rng.integers(3, max_pages * page_size, S).astype(np.int32)
    num_prompt = np.minimum(rng.integers(1, 10, S), kv_lens - 1).astype(np.int32)
    pages = rng.permutation(np.arange(1, num_pages))
    for r in range(S):
        page_tables[r] = pages[r * max_pages // 2 : r * max_pages // 2 + max_pages] % num_pages
    masks = {}
    for r, p in enumerate(rows):
        if p.allowed_token_ids is not None:
            masks[r] = packed_mask(p.allowed_token_ids, VOCAB)
    from paged_jax.engine.plan import StepPlan
    from paged_jax.runtime.controls import pack_controls

    items = [
        type("Item", (), {"params": p, "num_prompt_tokens": int(n)})
        for p, n in zip(rows, num_prompt, strict=True)
    ]
    controls = pack_controls(StepPlan(scheduled=tuple(items)), masks, S, VOCAB)
    got = np.asarray(
        jax.jit(apply_controls)(
            jnp.asarray(logits),
            jnp.asarray(token_pages),
            jnp.asarray(page_tables),
            jnp.asarray(kv_lens),
            {k: jnp.asarray(v) for k, v in controls.items()},
        )
    )
    for r, p in enumerate(rows):
        tokens = token_pages[page_tables[r]].reshape(-1)[: kv_lens[r]]
        want = vllm_oracle(logits[r], tokens[: num_prompt[r]], tokens[num_prompt[r] :], p)
        finite = np.isfinite(want)
        assert (np.isfinite(got[r]) == finite).all(), list(CASES)[r]
        np.testing.assert_allclose(got[r][finite], want[finite], rtol=1e-5, atol=1e-4)
    assert (got[0] == logits[0]).all()  # a row without controls is untouched


@pytest.fixture(scope="module")
def tiny():
    llm = LLM(
        "random:tiny",
        dtype="float32",
        num_pages=64,
        max_model_len=64,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        decode_steps=4,
        warmup_progress=False,
    )
    yield llm
    llm.close()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [100, 3, 3, 3, 200, 9], [400, 401, 27, 81]]


def test_engine_greedy_with_controls_follows_the_oracle(tiny):
    runner = tiny._driver.runner
    names = list(CASES)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = tiny.generate(prompts, [CASES[n] for n in names], use_tqdm=False)
    assert tiny.stats()["compiles_after_warmup"] == 0  # a mixed batch: nothing compiled
    assert any(r.num_steps > 1 for r in tiny.timeline)  # penalties counted inside bursts too
    plain = tiny.generate(PROMPTS, CASES["none"], use_tqdm=False)
    outputs = [o.outputs[0].token_ids for o in outs]
    width = max(len(p) + len(o) for p, o in zip(prompts, outputs, strict=True))
    ids = np.zeros((len(names), width), np.int32)  # right-padded: causal, so harmless
    for r, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        ids[r, : len(p) + len(o)] = p + o
    ref = np.asarray(dense_logits(runner.params, runner.cfg, jnp.asarray(ids)))  # f32[B, T, V]
    for r, (name, prompt, output) in enumerate(zip(names, prompts, outputs, strict=True)):
        assert len(output) == 12
        for j, token in enumerate(output):
            oracle = vllm_oracle(ref[r, len(prompt) - 1 + j], prompt, output[:j], CASES[name])
            top2 = np.sort(oracle)[-2:]
            if top2[1] - top2[0] > 1e-4:  # a near tie may go either way in f32
                assert token == int(np.argmax(oracle)), (name, j)
        if name not in ("none", "bias"):  # the control changed something: this test can fail
            assert output != plain[PROMPTS.index(prompt)].outputs[0].token_ids, name
    assert set(outputs[names.index("allowed")]) <= set(CASES["allowed"].allowed_token_ids)


def test_sampled_controls_are_batch_independent(tiny):
    """Seeded sampling with controls: the same tokens alone and in a mixed batch."""
    params = SamplingParams(
        temperature=0.9,
        seed=5,
        max_tokens=10,
        ignore_eos=True,
        repetition_penalty=1.4,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        logit_bias={4: 3.0},
        top_p=0.9,
        detokenize=False,
    )
    alone = tiny.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = tiny.generate(
        PROMPTS + [PROMPTS[1]],
        [CASES["all"], CASES["none"], CASES["bias"], params],
        use_tqdm=False,
    )
    assert batch[-1].outputs[0].token_ids == alone
    assert tiny.stats()["compiles_after_warmup"] == 0


def test_token_ids_outside_the_vocab_are_refused(tiny):
    with pytest.raises(ValueError, match="logit_bias"):
        tiny.generate(
            [PROMPTS[0]], SamplingParams(logit_bias={VOCAB: 1.0}, detokenize=False), use_tqdm=False
        )
    with pytest.raises(ValueError, match="allowed_token_ids"):
        tiny.generate(
            [PROMPTS[0]],
            SamplingParams(allowed_token_ids=[1, VOCAB + 3], detokenize=False),
            use_tqdm=False,
        )


def test_logprobs_are_raw_and_ranked_as_vllm(tiny):
    """Sampled tokens under controls: their Logprob is of the raw model distribution, ranked
    as vLLM ranks (the top-k ranks 1..k; the sampled token's rank is how many are >= it)."""
    params = SamplingParams(
        temperature=1.0,
        seed=2,
        max_tokens=6,
        ignore_eos=True,
        logprobs=4,
        detokenize=False,
        presence_penalty=1.0,
        logit_bias={9: 5.0},
    )
    out = tiny.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0]
    runner = tiny._driver.runner
    ids = jnp.asarray([PROMPTS[0] + out.token_ids], jnp.int32)
    ref = np.asarray(jax.nn.log_softmax(dense_logits(runner.params, runner.cfg, ids)[0]))
    total = 0.0
    for j, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        raw = ref[len(PROMPTS[0]) - 1 + j]
        assert abs(entry[token].logprob - raw[token]) < 1e-4
        assert entry[token].rank == int(np.sum(raw >= raw[token]))
        top = sorted(
            (e for t, e in entry.items() if t != token or e.rank <= 4), key=lambda e: e.rank
        )
        assert [e.rank for e in top][:4] == [1, 2, 3, 4]
        total += entry[token].logprob
    assert abs(out.cumulative_logprob - total) < 1e-6
