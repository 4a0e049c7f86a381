"""The three eval tasks, run on an ``LLM``: perplexity (prompt logprobs over rolling windows),
multiple choice (summed logprob of each choice's continuation) and greedy generation scored by
exact match / containment. Each returns a ``TaskResult``; the maths lives in ``scoring``.

Every task sends all its requests in one ``LLM.generate`` call, so the engine batches them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from paged_jax.engine.outputs import Logprob
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.eval import scoring
from paged_jax.eval.config import (
    GenerationTask,
    MultipleChoiceTask,
    PerplexityTask,
    Task,
    resolve_path,
)
from paged_jax.io.jsonl import json_objects

logger = logging.getLogger(__name__)

# One token is sampled after each scored prompt (the engine always samples); it is ignored.
SCORE_PARAMS = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}


@dataclasses.dataclass
class TaskResult:
    metrics: dict[str, float]
    counts: dict[str, int]
    samples: list[dict[str, Any]]  # per document / question, for inspection


def read_jsonl(path: str, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Records of a jsonl file (blank lines skipped); ValueError naming the line and field."""
    records = []
    for n, record in json_objects(resolve_path(path).read_text(encoding="utf-8"), path):
        for key, kind in required.items():
            if not isinstance(record.get(key), kind):
                raise ValueError(f"{path}:{n}: field {key!r} is missing or not {kind}")
        record.setdefault("id", str(len(records)))
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _prompt_logprob(entries: list[dict[int, Logprob] | None], pos: int, token_id: int) -> float:
    entry = entries[pos]
    if entry is None:
        raise ValueError(f"prompt position {pos} has no logprob (the first is never scored)")
    return entry[token_id].logprob


def run_perplexity(llm: Any, task: PerplexityTask, progress: bool) -> TaskResult:
    max_len = llm.scheduler_config.max_model_len
    window = task.window or max_len
    if window > max_len:
        raise ValueError(f"window={window} exceeds the engine's max_model_len={max_len}")
    stride = task.stride or max(window // 2, 1)
    docs, jobs = [], []  # jobs: (doc index, window)
    for path in task.paths:
        text = resolve_path(path).read_text(encoding="utf-8")
        ids = llm.tokenizer.encode(text, add_bos=task.add_bos)
        docs.append((path, ids, len(text.encode("utf-8"))))
        jobs += [(len(docs) - 1, w) for w in scoring.perplexity_windows(len(ids), window, stride)]
    prompts = [docs[d][1][w.begin : w.end] for d, w in jobs]
    params = SamplingParams(prompt_logprobs=0, **SCORE_PARAMS)
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    by_doc: list[list[tuple[Any, list]]] = [[] for _ in docs]
    for (d, w), out in zip(jobs, outputs, strict=True):
        by_doc[d].append((w, out.prompt_logprobs))
    samples, total_nll, total_tokens, total_bytes = [], 0.0, 0, 0
    for (path, ids, num_bytes), pieces in zip(docs, by_doc, strict=True):
        entries = {w: e for w, e in pieces}
        nll, count = scoring.window_nll(
            [w for w, _ in pieces],
            lambda w, pos, ids=ids, entries=entries: _prompt_logprob(
                entries[w], pos - w.begin, ids[pos]
            ),
        )
        total_nll, total_tokens, total_bytes = (
            total_nll + nll,
            total_tokens + count,
            total_bytes + num_bytes,
        )
        samples.append(
            {
                "path": path,
                "tokens": len(ids),
                "scored_tokens": count,
                "windows": len(pieces),
                "perplexity": scoring.perplexity(nll, count),
            }
        )
    metrics = {
        "perplexity": scoring.perplexity(total_nll, total_tokens),
        "nll_per_token": total_nll / total_tokens if total_tokens else float("nan"),
    }
    counts = {
        "documents": len(docs),
        "scored_tokens": total_tokens,
        "windows": len(jobs),
        "window": window,
        "stride": stride,
        "bytes": total_bytes,
        "model_tokens": sum(len(p) for p in prompts),
    }
    return TaskResult(metrics, counts, samples)


def run_multiple_choice(llm: Any, task: MultipleChoiceTask, progress: bool) -> TaskResult:
    records = read_jsonl(task.path, {"question": str, "choices": list, "answer": int})
    records = records[: task.limit] if task.limit else records
    prompts, spans = [], []  # spans: (record index, choice index, context length)
    for r, record in enumerate(records):
        choices = record["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{task.path}: record {record['id']}: choices must be >= 2 strings")
        if not 0 <= record["answer"] < len(choices):
            raise ValueError(f"{task.path}: record {record['id']}: answer is no choice index")
        context = task.template.format(question=record["question"])
        for c, choice in enumerate(choices):
            ctx, cont = scoring.continuation_ids(
                llm.tokenizer.encode, context, task.choice_prefix + choice
            )
            prompts.append(ctx + cont)
            spans.append((r, c, len(ctx)))
    params = SamplingParams(prompt_logprobs=1, **SCORE_PARAMS)
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    scores: list[list[scoring.ChoiceScore]] = [[] for _ in records]
    for (r, c, ctx_len), ids, out in zip(spans, prompts, outputs, strict=True):
        entries = out.prompt_logprobs
        logprob, greedy = 0.0, True
        for pos in range(ctx_len, len(ids)):
            token_logprob = _prompt_logprob(entries, pos, ids[pos])
            logprob += token_logprob
            greedy &= token_logprob >= max(e.logprob for e in entries[pos].values())
        num_chars = len(task.choice_prefix + records[r]["choices"][c])
        scores[r].append(scoring.ChoiceScore(logprob, len(ids) - ctx_len, num_chars, greedy))
    acc, acc_norm, samples = [], [], []
    for record, choice_scores in zip(records, scores, strict=True):
        pick, pick_norm = scoring.choose(choice_scores)
        acc.append(float(pick == record["answer"]))
        acc_norm.append(float(pick_norm == record["answer"]))
        samples.append(
            {
                "id": record["id"],
                "answer": record["answer"],
                "pick": pick,
                "pick_norm": pick_norm,
                "logprobs": [s.logprob for s in choice_scores],
                "is_greedy": [s.is_greedy for s in choice_scores],
            }
        )
    metrics = {
        **scoring.mean_and_stderr("acc", acc),
        **scoring.mean_and_stderr("acc_norm", acc_norm),
    }
    counts = {
        "questions": len(records),
        "requests": len(prompts),
        "model_tokens": sum(map(len, prompts)),
    }
    return TaskResult(metrics, counts, samples)


def _answers(record: dict[str, Any], path: str) -> list[str]:
    answer = record["answer"]
    answers = [answer] if isinstance(answer, str) else answer
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: record {record['id']}: answer must be a str or a list of str")
    return answers


def generation_prompt(task: GenerationTask, records: list[dict[str, Any]], index: int) -> str:
    """The question of ``records[index]`` after ``num_fewshot`` solved other records."""
    shots = [r for i, r in enumerate(records) if i != index][: task.num_fewshot]
    parts = [
        task.template.format(question=r["question"]) + " " + _answers(r, task.path)[0]
        for r in shots
    ]
    parts.append(task.template.format(question=records[index]["question"]))
    return task.fewshot_separator.join(parts)


def run_generation(llm: Any, task: GenerationTask, progress: bool) -> TaskResult:
    records = read_jsonl(task.path, {"question": str, "answer": (str, list)})
    answers = [_answers(r, task.path) for r in records]
    count = min(task.limit or len(records), len(records))
    texts = [generation_prompt(task, records, i) for i in range(count)]
    prompts = [[{"role": "user", "content": t}] for t in texts] if task.chat else texts
    params = SamplingParams(
        temperature=0.0, max_tokens=task.max_tokens, stop=list(task.stop) or None
    )
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    exact, contained, samples = [], [], []
    for record, refs, out in zip(records, answers, outputs, strict=False):
        text = out.outputs[0].text.strip()
        exact.append(float(scoring.exact_match(text, refs)))
        contained.append(float(scoring.contains(text, refs)))
        samples.append(
            {
                "id": record["id"],
                "output": text,
                "answers": refs,
                "exact_match": bool(exact[-1]),
                "contains": bool(contained[-1]),
            }
        )
    metrics = {
        **scoring.mean_and_stderr("exact_match", exact),
        **scoring.mean_and_stderr("contains", contained),
    }
    counts = {
        "questions": count,
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
    }
    return TaskResult(metrics, counts, samples)


RUNNERS = {
    PerplexityTask: run_perplexity,
    MultipleChoiceTask: run_multiple_choice,
    GenerationTask: run_generation,
}


def run_task(llm: Any, task: Task, progress: bool = True) -> TaskResult:
    return RUNNERS[type(task)](llm, task, progress)
