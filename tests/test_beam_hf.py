"""Beam search against HF transformers on the bundled SmolLM2 (CPU, f32): every case of
``tests/data/beams_smollm2.json`` (made by ``scripts/make_fixtures.py --only beams``: beam
widths 2-4, with and without EOS, length penalties 1.0 / 0.5, early_stopping False / True /
"never") must give HF's sequences, in HF's order, with scores within 1e-3."""

from __future__ import annotations

import json

import pytest

from paged_jax import LLM, BeamSearchParams

CASES = json.loads((__import__("pathlib").Path(__file__).parent / "data" / "beams_smollm2.json")
                   .read_text())  # fmt: skip
SCORE_TOL = 1e-3


@pytest.fixture(scope="module")
def results():
    cases = CASES["cases"]
    # a small pool: 30 searches of up to 4 beams queue and preempt, the results must not care
    llm = LLM("smollm2-135m", dtype="float32", max_model_len=64, max_num_seqs=32,
              max_num_batched_tokens=128, num_pages=36, warmup_progress=False)  # fmt: skip
    # HF stops on <|im_end|> (2); the engine also on the tokenizer's <|endoftext|> (0), which
    # never ranks among these cases' candidates (else the sequences below would differ)
    assert set(CASES["hf_eos_token_ids"]) <= llm._driver.scheduler.eos_token_ids
    params = [
        BeamSearchParams(
            beam_width=c["beam_width"],
            max_tokens=c["max_new_tokens"],
            length_penalty=c["length_penalty"],
            early_stopping=c["early_stopping"],
            ignore_eos=c["eos_token_ids"] is None,
        )
        for c in cases
    ]
    outs = llm.beam_search([c["prompt_token_ids"] for c in cases], params, use_tqdm=False)
    stats = llm.stats()
    assert llm.kv_cache.num_used_pages == 0
    llm.kv_cache.check()
    llm.close()
    return cases, outs, stats


def test_sequences_and_scores_equal_hf(results):
    cases, outs, _ = results
    worst = 0.0
    for case, out in zip(cases, outs, strict=True):
        ours = [(s.token_ids, s.score) for s in out.sequences]
        hf = [(h["token_ids"], h["score"]) for h in case["hypotheses"]]
        assert len(ours) == len(hf) == case["beam_width"], case["name"]
        for (ids, score), (hf_ids, hf_score) in zip(ours, hf, strict=True):
            assert ids == hf_ids, (case["name"], ids, hf_ids)
            worst = max(worst, abs(score - hf_score))
            assert score == pytest.approx(hf_score, abs=SCORE_TOL), case["name"]
    print(f"{len(cases)} cases, max |score - HF| = {worst:.2e}")


def test_eos_hypotheses_and_text(results):
    cases, outs, _ = results
    num_eos = 0
    for case, out in zip(cases, outs, strict=True):
        for seq, hyp in zip(out.sequences, case["hypotheses"], strict=True):
            num_eos += hyp["finished_by_eos"]
            assert seq.token_ids[-1] == 2 if hyp["finished_by_eos"] else len(seq.token_ids) == (
                case["max_new_tokens"])  # fmt: skip
    assert num_eos > 0  # the chat prompt's cases end on <|im_end|>
    assert outs[0].sequences[0].text.startswith(" Paris.")


def test_beams_shared_pages_and_compiled_nothing(results):
    _, _, stats = results
    assert stats["kv_sharing_saving"] > 0.2
    assert stats["compiles_after_warmup"] == 0
    assert stats["preemptions"] > 0  # the 36-page pool preempted whole beam groups
