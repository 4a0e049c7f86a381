"""What the driver keeps per request, and how prompts become token ids."""

from __future__ import annotations

import numbers
from typing import Any

from paged_jax.engine.beam import BeamGroup
from paged_jax.engine.outputs import (
    BeamSearchOutput,
    BeamSequence,
    CompletionOutput,
    Logprob,
    RequestOutput,
)
from paged_jax.engine.plan import ScheduledSeq
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.sequence import Sequence as Seq
from paged_jax.io.detokenizer import IncrementalDetokenizer
from paged_jax.io.tokenizer import Tokenizer
from paged_jax.runtime.inflight import StepOutput
from paged_jax.structured import TokenConstraints

Prompt = str | list[int] | list[dict[str, str]]


class Completion:
    """One completion's detokenizer, returned text, logprobs and token mask (a request has n
    of them)."""

    def __init__(
        self,
        seq: Seq,
        detok: IncrementalDetokenizer | None,
        constraints: TokenConstraints | None = None,
    ) -> None:
        self.seq = seq
        self.detok = detok
        self.constraints = constraints
        self.text = ""  # returned text: detokenized output, cut at a stop string
        # {token id: Logprob} per output token
        self.logprobs: list[dict[int, Logprob]] | None = None
        self.cumulative_logprob: float | None = None
        if seq.sampling_params.logprobs is not None:
            self.logprobs, self.cumulative_logprob = [], 0.0

    def output(self) -> CompletionOutput:
        seq = self.seq
        return CompletionOutput(
            index=seq.index,
            text=self.text,
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=self.logprobs,
            cumulative_logprob=self.cumulative_logprob,
        )


class Request:
    """A request's completions (n of them, sharing one prompt) and its prompt logprobs."""

    def __init__(self, completions: list[Completion]) -> None:
        self.completions = completions
        first = completions[0].seq
        # per prompt token (None for the first): {token id: Logprob}
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None
        if first.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * first.num_prompt_tokens

    @property
    def seq(self) -> Seq:
        """The first completion's sequence (the only one when n == 1)."""
        return self.completions[0].seq

    @property
    def seqs(self) -> list[Seq]:
        return [c.seq for c in self.completions]

    @property
    def text(self) -> str:
        return self.completions[0].text

    @property
    def is_finished(self) -> bool:
        return all(c.seq.is_finished for c in self.completions)

    def record_logprobs(
        self, completion: Completion, item: ScheduledSeq, row: int, out: StepOutput, offset: int
    ) -> None:
        """Keep this step's logprobs of one completion: ``row`` in the sampled arrays,
        ``offset`` of its first packed token. Recomputed prompt positions overwrite the same
        values."""
        seq = completion.seq
        params = seq.sampling_params
        tok = completion.detok.tokenizer if completion.detok is not None else None
        if self.prompt_logprobs is not None and out.prompt_logprobs is not None:
            p = out.prompt_logprobs
            last = min(item.kv_len, seq.num_prompt_tokens - 1)
            for pos in range(item.start_position, last):  # scores prompt token pos + 1
                j = offset + pos - item.start_position
                self.prompt_logprobs[pos + 1] = _entry(
                    p, j, seq.token_ids[pos + 1], params.prompt_logprobs, tok
                )
        if completion.logprobs is not None and item.sample and out.logprobs is not None:
            token_id = int(out.sampled[row])
            entry = _entry(out.logprobs, row, token_id, params.logprobs, tok)
            completion.logprobs.append(entry)
            completion.cumulative_logprob += entry[token_id].logprob

    def output(self) -> RequestOutput:
        seq = self.seq
        times = [c.seq.metrics() for c in self.completions]
        metrics = times[0]
        if len(times) > 1:  # the request's first token and its last completion's end
            firsts = [t.first_token_time for t in times if t.first_token_time is not None]
            ends = [t.finished_time for t in times]
            metrics.first_token_time = min(firsts, default=None)
            metrics.finished_time = None if None in ends else max(ends)
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=list(seq.prompt_token_ids),
            outputs=[c.output() for c in self.completions],
            finished=self.is_finished,
            metrics=metrics,
            prompt_logprobs=self.prompt_logprobs,
        )


class BeamRequest:
    """A beam search request: its beam group, whose hypotheses become the output."""

    def __init__(self, group: BeamGroup) -> None:
        self.group = group
        self.seq = group.members[0]  # the first beam: request id, prompt

    @property
    def seqs(self) -> list[Seq]:
        return self.group.unfinished

    @property
    def is_finished(self) -> bool:
        return self.group.done

    def output(self, tokenizer: Tokenizer | None) -> BeamSearchOutput:
        seq = self.seq
        sequences = [
            BeamSequence(
                text=tokenizer.decode(list(h.token_ids)) if tokenizer is not None else "",
                token_ids=list(h.token_ids),
                score=h.score,
            )
            for h in self.group.hypotheses
        ]
        return BeamSearchOutput(seq.request_id, seq.prompt, list(seq.prompt_token_ids), sequences)


def _entry(
    arrays: dict[str, Any], j: int, token_id: int, k: int, tok: Tokenizer | None
) -> dict[int, Logprob]:
    """Top-k {token id: Logprob} of row ``j`` plus ``token_id``'s own (first, as vLLM)."""

    def text(t: int) -> str | None:
        return None if tok is None else tok.decode([t], skip_special_tokens=False)

    entry = {token_id: Logprob(float(arrays["target"][j]), int(arrays["rank"][j]), text(token_id))}
    top_ids, top = arrays["top_ids"][j, :k].tolist(), arrays["top"][j, :k].tolist()
    for rank, (t, v) in enumerate(zip(top_ids, top, strict=True), start=1):
        if t != token_id:
            entry[t] = Logprob(v, rank, text(t))
    return entry


def encode_prompt(
    tok: Tokenizer | None, vocab_size: int, prompt: Prompt, model: str
) -> tuple[str | None, list[int]]:
    """Text (when there is one) and token ids of one prompt; ValueError naming the problem."""
    needs_tokenizer = isinstance(prompt, str) or (
        isinstance(prompt, list | tuple) and prompt and isinstance(prompt[0], dict | str)
    )
    if tok is None and needs_tokenizer:
        raise ValueError(f"model={model!r} has no tokenizer: prompts must be token ids")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt, tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for i, message in enumerate(prompt):
            if not isinstance(message.get("role"), str) or "content" not in message:
                raise ValueError(f"messages[{i}] must have a 'role' and a 'content'")
            if not isinstance(message["content"], str):
                raise ValueError(f"messages[{i}]['content']={message['content']!r} must be a str")
        if tok.chat_template is None:
            raise ValueError("messages given, but the model has no chat template")
        text = tok.apply_chat_template(prompt, add_generation_prompt=True)
        return text, tok.encode(text, add_bos=False)
    if isinstance(prompt, list | tuple) and prompt and all(isinstance(p, str) for p in prompt):
        raise ValueError(
            f"prompt is a list of {len(prompt)} str: one call takes one prompt here "
            "(generate takes a list of prompts)"
        )
    if isinstance(prompt, list | tuple) and prompt:
        ids = list(prompt)
        vocab = vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                raise ValueError(
                    f"prompt_token_ids[{i}]={t!r} must be an int, got {type(t).__name__}"
                )
            if not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids[{i}]={t!r} is not a token id in [0, {vocab})")
        return None, [int(t) for t in ids]
    raise ValueError(
        "prompt must be a non-empty str, token id list or message list, got "
        f"{type(prompt).__name__} {prompt!r}"
        + (": use .tolist()" if hasattr(prompt, "tolist") else "")
    )


def as_prompt_list(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple) and prompts:
        first = prompts[0]
        if isinstance(first, int) or isinstance(first, dict):
            return [list(prompts)]  # one token-id prompt or one chat
        return list(prompts)
    raise ValueError(f"prompts must be a prompt or a non-empty list of prompts, got {prompts!r}")


def as_params_list(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, list | tuple):
        raise ValueError(
            f"sampling_params must be SamplingParams or a list of them, got {type(params).__name__}"
        )
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
    return params
