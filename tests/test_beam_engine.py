"""Beam search engine properties on random:tiny in f32 (CPU): width 1 is greedy decoding, the
scores are the beams' log-probabilities under an independent dense re-scoring (prompt_logprobs
of prompt + beam), beams share KV pages, and a pool too small for every search at once
preempts without changing a result. (The comparison with HF transformers' own beam search on
SmolLM2 lives elsewhere.)
"""

from __future__ import annotations

import numpy as np
import pytest

from paged_jax import LLM, SamplingParams
from paged_jax.engine.beam import BeamSearchParams

PAGE = 8
VOCAB = 512
MAX_MODEL_LEN = 96
ENGINE = dict(
    dtype="float32",
    page_size=PAGE,
    max_model_len=MAX_MODEL_LEN,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    warmup_progress=False,
)


@pytest.fixture(scope="module")
def big():
    llm = LLM("random:tiny", num_pages=96, **ENGINE)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def tiny():
    """Just the pages one max_model_len sequence needs (12 of 8 tokens), plus NULL_PAGE."""
    llm = LLM("random:tiny", num_pages=MAX_MODEL_LEN // PAGE + 1, **ENGINE)
    yield llm
    llm.close()


def prompt_of(seed, length):
    return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


def beams(out):
    return [s.token_ids for s in out.sequences]


def assert_idle(llm):
    kv = llm.kv_cache
    assert kv.num_used_pages == 0 and kv.num_filled_tokens == 0 and kv.num_table_pages == 0
    assert llm._driver.num_unfinished == 0 and not llm._driver.scheduler.has_unfinished()
    kv.check()


def dense_logprobs(llm, prompt, outputs):
    """Per sequence in ``outputs``: the log-probs of its tokens after ``prompt``, scored in
    one prefill of prompt + tokens (prompt_logprobs, no beam code involved)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    scored = llm.generate([prompt + list(t) for t in outputs], params, use_tqdm=False)
    result = []
    for out, tokens in zip(scored, outputs, strict=True):
        full = prompt + list(tokens)
        lps = out.prompt_logprobs
        assert lps[0] is None and len(lps) == len(full)
        result.append([lps[j][full[j]].logprob for j in range(len(prompt), len(full))])
    return result


def test_width_1_is_greedy(big):
    prompts = [prompt_of(1, 17), prompt_of(2, 5), prompt_of(3, 40)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0,
                            detokenize=False)  # fmt: skip
    want = big.generate(prompts, greedy, use_tqdm=False)
    got = big.beam_search(prompts, BeamSearchParams(beam_width=1, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)  # fmt: skip
    for g, w in zip(got, want, strict=True):
        assert len(g.sequences) == 1
        assert g.sequences[0].token_ids == w.outputs[0].token_ids
        # The score is the mean log-prob (length_penalty 1) of the greedy tokens.
        c = w.outputs[0]
        lps = [e[t].logprob for e, t in zip(c.logprobs, c.token_ids, strict=True)]
        assert abs(g.sequences[0].score - sum(lps) / 12) < 1e-4
    assert_idle(big)


@pytest.mark.parametrize("width", [3, 4])
def test_scores_are_dense_log_probs_best_first(big, tiny, width):
    prompts = [prompt_of(10 + width, 23), prompt_of(20 + width, 9), prompt_of(30 + width, 33),
               prompt_of(40 + width, 16)]  # fmt: skip
    penalties = [1.0, 0.5, 2.0, 0.0]
    params = [BeamSearchParams(beam_width=width, max_tokens=10, length_penalty=lp, ignore_eos=True)
              for lp in penalties]  # fmt: skip
    outs = big.beam_search(prompts, params, use_tqdm=False)
    for prompt, out, lp in zip(prompts, outs, penalties, strict=True):
        assert out.prompt_token_ids == prompt
        assert len(out.sequences) == width
        scores = [s.score for s in out.sequences]
        assert scores == sorted(scores, reverse=True), scores
        assert len({tuple(t) for t in beams(out)}) == width, "beams must differ"
        for seq, lps in zip(out.sequences, dense_logprobs(tiny, prompt, beams(out)), strict=True):
            assert len(seq.token_ids) == 10  # ignore_eos: every hypothesis ends at max_tokens
            assert abs(seq.score - sum(lps) / len(lps) ** lp) < 1e-4, (seq.score, lps, lp)
    assert_idle(big)
    assert_idle(tiny)


def test_beams_share_pages(big):
    big.reset_stats()
    (out,) = big.beam_search([prompt_of(50, 29)],
                             BeamSearchParams(beam_width=4, max_tokens=16, ignore_eos=True),
                             use_tqdm=False)  # fmt: skip
    assert len(out.sequences) == 4
    stats = big.stats()
    assert stats["kv_sharing_saving"] > 0
    # While the beams run, their page tables hold more pages than are in use.
    assert any(r.num_table_pages > r.num_used_pages > 0 for r in big.timeline)
    assert max(r.num_seqs for r in big.timeline) == 4  # the 4 beams step together
    assert_idle(big)
    assert big.kv_cache.num_free_pages == big.kv_cache.num_usable_pages


def test_tiny_pool_preempts_and_gives_the_same_beams(big, tiny):
    # each group fits the 12 usable pages even with its beams fully diverged; together they
    # do not, so groups preempt each other
    prompts = [prompt_of(60 + i, length) for i, length in enumerate([41, 25, 51, 12])]
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    want = big.beam_search(prompts, params, use_tqdm=False)
    before = tiny.stats()["preemptions"]
    got = tiny.beam_search(prompts, params, use_tqdm=False)
    assert tiny.stats()["preemptions"] > before, "the pool should be too small for all at once"
    for g, w in zip(got, want, strict=True):
        assert beams(g) == beams(w)
        for a, b in zip(g.sequences, w.sequences, strict=True):
            assert abs(a.score - b.score) < 1e-4
    assert_idle(tiny)
    assert_idle(big)


def test_beams_that_could_outgrow_the_pool_are_refused(tiny):
    """Beams that diverge right after the prompt each hold their own pages: a group that could
    need more than the pool alone would preempt itself forever, so it is refused up front."""
    with pytest.raises(ValueError, match=r"beam_width=3 .* need 13 KV pages"):
        tiny.beam_search([prompt_of(73, 40)], BeamSearchParams(beam_width=3, max_tokens=16),
                         use_tqdm=False)  # fmt: skip
    assert_idle(tiny)
    # the same prompt with fewer tokens to go fits (4 + 3 * 2 pages) and runs
    (out,) = tiny.beam_search([prompt_of(73, 40)],
                              BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True),
                              use_tqdm=False)  # fmt: skip
    assert [len(t) for t in beams(out)] == [8, 8, 8]
    assert_idle(tiny)


def test_validation(big):
    for kw, field in [
        (dict(beam_width=0), "beam_width"),
        (dict(beam_width=11), "beam_width"),
        (dict(beam_width=True), "beam_width"),
        (dict(beam_width=2, max_tokens=0), "max_tokens"),
        (dict(beam_width=2, early_stopping="sometimes"), "early_stopping"),
        (dict(beam_width=2, length_penalty="1"), "length_penalty"),
        (dict(beam_width=2, ignore_eos=1), "ignore_eos"),
    ]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kw)
    ok = prompt_of(70, 10)
    too_long = prompt_of(71, MAX_MODEL_LEN - 15)  # 81 + 16 > 96
    with pytest.raises(ValueError, match=r"max_tokens=16.*max_model_len=96"):
        big.beam_search([ok, too_long], BeamSearchParams(beam_width=2, max_tokens=16),
                        use_tqdm=False)  # fmt: skip
    with pytest.raises(ValueError, match="beam_width=9"):  # more than max_num_seqs=8
        big.beam_search([ok], BeamSearchParams(beam_width=9), use_tqdm=False)
    with pytest.raises(ValueError, match="must be BeamSearchParams"):
        big.beam_search([ok], [SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        big.beam_search([ok], [BeamSearchParams(beam_width=2)] * 2, use_tqdm=False)
    assert_idle(big)  # nothing was queued: the valid first prompt neither
    # Exactly at max_model_len is fine.
    (out,) = big.beam_search([prompt_of(72, MAX_MODEL_LEN - 4)],
                             BeamSearchParams(beam_width=2, max_tokens=4, ignore_eos=True),
                             use_tqdm=False)  # fmt: skip
    assert [len(t) for t in beams(out)] == [4, 4]
    assert_idle(big)


def test_no_compiles_after_warmup(big):
    """Last: n > 1 sampling and every beam search above ran on warmed-up executables."""
    outs = big.generate([prompt_of(80, 14), prompt_of(81, 30)],
                        SamplingParams(n=3, seed=1, max_tokens=10, detokenize=False),
                        use_tqdm=False)  # fmt: skip
    assert [len(o.outputs) for o in outs] == [3, 3]
    big.beam_search([prompt_of(82, 20)], BeamSearchParams(beam_width=5, max_tokens=6),
                    use_tqdm=False)  # fmt: skip
    assert big.stats()["compiles_after_warmup"] == 0
    assert_idle(big)


def test_lone_sampling_params_is_a_value_error(big):
    with pytest.raises(ValueError, match="must be BeamSearchParams"):
        big.beam_search([prompt_of(90, 5)], SamplingParams(), use_tqdm=False)
