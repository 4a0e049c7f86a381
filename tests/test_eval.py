"""Eval runs (paged_jax.eval): windowing and scoring maths with fakes, yaml/gin configs and
their errors, and on the bundled SmolLM2: perplexity against HF transformers (fixture), multiple
choice against a dense forward, yaml and gin runs giving the same results, and the CLI.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from paged_jax.engine.outputs import Logprob
from paged_jax.eval import scoring
from paged_jax.eval.config import GenerationTask, MultipleChoiceTask, PerplexityTask, from_dict
from paged_jax.eval.loaders import load_gin, load_yaml
from paged_jax.eval.tasks import generation_prompt, run_task

CONFIGS = Path(__file__).parent.parent / "configs" / "eval"
SMALL = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, warmup=False)

# ------------------------------------------------------------------ pure maths


@pytest.mark.parametrize("n", [1, 2, 5, 16, 17, 100, 257])
@pytest.mark.parametrize("window,stride", [(16, 8), (16, 16), (16, 1), (5, 3), (2, 1)])
def test_windows_score_each_token_once(n, window, stride):
    windows = scoring.perplexity_windows(n, window, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin <= window and w.begin < w.score_from for w in windows)
    if stride < window:
        assert scored == list(range(1, n))  # in order, every token but the first
    else:  # no overlap: window starts have no context
        assert set(scored) == set(range(1, n)) - set(range(0, n, window))
    assert all(w.end <= n for w in windows)


def test_windows_context_is_the_overlap():
    windows = scoring.perplexity_windows(10, window=4, stride=2)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [
        (0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8),
    ]  # fmt: skip


@pytest.mark.parametrize("window,stride", [(1, 1), (4, 0), (4, 5)])
def test_windows_reject_bad_sizes(window, stride):
    with pytest.raises(ValueError, match="window|stride"):
        scoring.perplexity_windows(10, window, stride)


def test_continuation_split_moves_trailing_space():
    def encode(text):  # one token per word, the space glued in front (byte-level BPE style)
        return [hash(w) % 1000 for w in text.replace(" ", "\0 ").split("\0") if w]

    ctx, cont = scoring.continuation_ids(encode, "Question: x\nAnswer: ", "Paris")
    assert ctx + cont == encode("Question: x\nAnswer: Paris")
    assert cont == encode(" Paris")


def test_choose_raw_and_per_character():
    scores = [scoring.ChoiceScore(-4.0, 2, 2, False), scoring.ChoiceScore(-6.0, 3, 12, False)]
    assert scoring.choose(scores) == (0, 1)  # raw: -4 > -6; per character: -6/12 > -4/2


def test_answer_matching():
    assert scoring.exact_match(" Paris.", ["paris"])
    assert not scoring.exact_match("Paris is nice", ["Paris"])
    assert scoring.contains("I think Paris is nice.", ["Paris"])
    assert not scoring.contains("Parisian", ["Paris"])
    assert scoring.exact_match("forty-two", ["42", "Forty-Two"])


class FakeLLM:
    """Prompt logprobs from a bigram table, so any windowing must give the full-text sum."""

    def __init__(self, max_model_len=8):
        self.scheduler_config = SimpleNamespace(max_model_len=max_model_len)
        self.tokenizer = SimpleNamespace(
            encode=lambda text, add_bos=None: [ord(c) % 50 for c in text]
        )

    @staticmethod
    def logprob(prev, tok):
        return -0.1 * (1 + (prev * 7 + tok) % 5)

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for ids in prompts:
            entries = [None] + [
                {t: Logprob(self.logprob(p, t))} for p, t in zip(ids, ids[1:], strict=False)
            ]
            outs.append(SimpleNamespace(prompt_logprobs=entries))
        return outs


def test_perplexity_aggregates_windows_token_weighted(tmp_path):
    text = "the quick brown fox jumps over the lazy dog"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt").write_text(text[:10])
    task = PerplexityTask(paths=(str(tmp_path / "a.txt"), str(tmp_path / "b.txt")), stride=3)
    result = run_task(FakeLLM(max_model_len=8), task, progress=False)
    nll, count = 0.0, 0
    for t in (text, text[:10]):
        ids = [ord(c) % 50 for c in t]
        nll -= sum(FakeLLM.logprob(p, q) for p, q in zip(ids, ids[1:], strict=False))
        count += len(ids) - 1
    assert result.counts["scored_tokens"] == count
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / count))


def test_generation_prompt_fewshot_leaves_the_question_out():
    records = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    task = GenerationTask(path="x.jsonl", template="Q: {question}\nA:", num_fewshot=2)
    assert generation_prompt(task, records, 0) == "Q: q1\nA: a1\n\nQ: q2\nA: a2\n\nQ: q0\nA:"
    assert generation_prompt(task, records, 1).startswith("Q: q0\nA: a0\n\nQ: q2")


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_shipped_yaml_and_gin_pairs_are_the_same_config(name):
    yaml_cfg = load_yaml(CONFIGS / f"{name}.yaml")
    assert yaml_cfg == load_gin([CONFIGS / f"{name}.gin"])
    assert from_dict(yaml_cfg.to_dict()) == yaml_cfg  # the JSON echo reads back
    assert yaml_cfg.model == name


def test_shipped_yaml_and_gin_overrides_agree():
    changed = load_yaml(CONFIGS / "smollm2-135m.yaml", ["tasks.mc_general.limit=3"])
    gin_changed = load_gin(
        [CONFIGS / "smollm2-135m.gin"], ["mc_general/MultipleChoiceTask.limit = 3"]
    )
    assert changed == gin_changed and changed.tasks["mc_general"].limit == 3


@pytest.mark.parametrize(
    "override,key",
    [
        ("tasks.mc_general.limt=3", "tasks.mc_general.limt"),
        ("engine.max_model_lenx=3", "max_model_lenx"),
        ("modle=x", "modle"),
        ("tasks.declaration_ppl.window=big", "window"),
        ("tasks.qa_short.type=essay", "tasks.qa_short.type"),
    ],
)
def test_bad_yaml_key_names_it(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_yaml(CONFIGS / "smollm2-135m.yaml", [override])


def test_bad_gin_key_names_it():
    with pytest.raises(ValueError, match="limt"):
        load_gin([CONFIGS / "smollm2-135m.gin"], ["mc_general/MultipleChoiceTask.limt = 3"])


def test_yaml_base_config_merges_mappings(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "engine: {max_model_len: 128, max_num_seqs: 4}\n"
        "tasks: {mc: {type: multiple_choice, path: a.jsonl}}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "base_config: base.yaml\nengine: {max_num_seqs: 2}\ntasks: {mc: {limit: 5}}\n"
    )
    cfg = load_yaml(tmp_path / "child.yaml")
    assert (cfg.engine.max_model_len, cfg.engine.max_num_seqs) == (128, 2)
    assert cfg.tasks["mc"] == MultipleChoiceTask(path="a.jsonl", limit=5)


# ------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    import paged_jax.build as llm_module
    from paged_jax import LLM

    original = llm_module.load_model  # one load for the engine and the dense reference
    llm_module.load_model = functools.lru_cache(maxsize=1)(original)
    try:
        yield LLM("smollm2-135m", dtype="float32", **SMALL)
    finally:
        llm_module.load_model = original


def test_perplexity_matches_hf_transformers(llm, data_dir):
    ref = json.loads((data_dir / "ppl_smollm2.json").read_text())
    case = ref["cases"][0]
    root = Path(__file__).parent.parent
    assert llm.tokenizer.encode((root / ref["text"]).read_text()) == ref["token_ids"]
    task = PerplexityTask(
        paths=("bundled:" + Path(ref["text"]).name,), window=case["window"], stride=case["stride"]
    )
    result = run_task(llm, task, progress=False)
    assert result.counts["scored_tokens"] == case["scored_tokens"]
    assert result.counts["windows"] == case["num_windows"]
    ppl = result.metrics["perplexity"]
    assert ppl == pytest.approx(case["perplexity"], rel=5e-3)


def test_multiple_choice_matches_dense_forward(llm):
    import jax
    import jax.numpy as jnp

    import paged_jax.build as llm_module
    from paged_jax.eval.tasks import read_jsonl
    from paged_jax.model.dense import dense_logits

    task = MultipleChoiceTask(path="bundled:mc_general.jsonl", limit=6)
    result = run_task(llm, task, progress=False)
    loaded = llm_module.load_model("smollm2-135m", "float32")
    rows, spans = [], []
    for record in read_jsonl(task.path, {})[: task.limit]:
        context = task.template.format(question=record["question"])
        for choice in record["choices"]:
            ctx, cont = scoring.continuation_ids(llm.tokenizer.encode, context, " " + choice)
            rows.append(ctx + cont)
            spans.append(len(ctx))
    width = max(map(len, rows))  # right padding: causal, so earlier positions are unaffected
    ids = jnp.asarray([r + [0] * (width - len(r)) for r in rows], dtype=jnp.int32)
    logp = np.asarray(jax.nn.log_softmax(dense_logits(loaded.params, loaded.config, ids), -1))
    dense = [
        sum(float(logp[i, pos - 1, row[pos]]) for pos in range(start, len(row)))
        for i, (row, start) in enumerate(zip(rows, spans, strict=True))
    ]
    engine = [lp for s in result.samples for lp in s["logprobs"]]
    np.testing.assert_allclose(engine, dense, atol=2e-3, rtol=1e-4)
    picks = [int(np.argmax(dense[i : i + 4])) for i in range(0, len(dense), 4)]
    assert [s["pick"] for s in result.samples] == picks


def _small_configs(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("We hold these truths to be self-evident, that all men are created equal.")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        f"name: small\noutput: {tmp_path / 'out.json'}\nengine: {json.dumps(SMALL)}\ntasks:\n"
        f"  ppl: {{type: perplexity, paths: ['{text}'], window: 12, stride: 6}}\n"
        "  mc: {type: multiple_choice, path: 'bundled:mc_general.jsonl', limit: 3}\n"
        "  qa: {type: generation, path: 'bundled:qa_short.jsonl', limit: 3, num_fewshot: 2,"
        " max_tokens: 8}\n"
    )
    gin_path = tmp_path / "run.gin"
    engine = ", ".join(f"'{k}': {v!r}" for k, v in SMALL.items())
    gin_path.write_text(
        f"EvalConfig.name = 'small'\nEvalConfig.output = '{tmp_path / 'out.json'}'\n"
        f"EvalConfig.engine = {{{engine}}}\n"
        "EvalConfig.tasks = {'ppl': @PerplexityTask(), 'mc': @MultipleChoiceTask(),"
        " 'qa': @GenerationTask()}\n"
        f"PerplexityTask.paths = ['{text}']\nPerplexityTask.window = 12\n"
        "PerplexityTask.stride = 6\n"
        "MultipleChoiceTask.path = 'bundled:mc_general.jsonl'\nMultipleChoiceTask.limit = 3\n"
        "GenerationTask.path = 'bundled:qa_short.jsonl'\nGenerationTask.limit = 3\n"
        "GenerationTask.num_fewshot = 2\nGenerationTask.max_tokens = 8\n"
    )
    return yaml_path, gin_path


def test_yaml_and_gin_runs_give_the_same_results(llm, tmp_path):
    from paged_jax.eval.runner import run_eval

    yaml_path, gin_path = _small_configs(tmp_path)
    yaml_cfg, gin_cfg = load_yaml(yaml_path), load_gin([gin_path])
    assert yaml_cfg == gin_cfg
    a = run_eval(yaml_cfg, llm, progress=False, write=False)
    b = run_eval(gin_cfg, llm, progress=False, write=False)
    for name in ("ppl", "mc", "qa"):
        assert a["tasks"][name]["metrics"] == b["tasks"][name]["metrics"]
        assert a["tasks"][name]["samples"] == b["tasks"][name]["samples"]
    assert a["tasks"]["qa"]["samples"][0]["output"] == "Paris"


def test_cli_eval_writes_result_and_summary(llm, tmp_path, monkeypatch, capsys):
    import paged_jax.eval.runner as runner
    from paged_jax.cli import main

    yaml_path, _ = _small_configs(tmp_path)
    monkeypatch.setattr(runner, "build_llm", lambda cfg: llm)
    assert main(["eval", "--config", str(yaml_path), "--quiet", "tasks.qa.limit=1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("eval small smollm2-135m: ppl perplexity=") and "mc acc=" in line
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["config"]["tasks"]["qa"]["limit"] == 1
    assert result["tasks"]["mc"]["counts"]["questions"] == 3
    assert result["tasks"]["ppl"]["tokens_per_s"] > 0 and result["seconds"] > 0
    assert main(["eval", "--config", str(yaml_path), "--gin-file", "x.gin"]) == 2
