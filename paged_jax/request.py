"""What the LLM loop keeps per request and per step, and how prompts become token ids."""

from __future__ import annotations

from typing import Any, NamedTuple

from paged_jax.engine.outputs import CompletionOutput, RequestOutput
from paged_jax.engine.plan import ScheduledSeq
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.sequence import Sequence as Seq
from paged_jax.io.detokenizer import IncrementalDetokenizer
from paged_jax.io.tokenizer import Tokenizer
from paged_jax.runtime.runner import StepOutput

Prompt = str | list[int] | list[dict[str, str]]


class StepRecord(NamedTuple):
    """One engine step or decode burst, for benchmarks and plots (seconds; time is
    perf_counter at its end). A burst's counts add up its steps."""

    time: float
    num_seqs: int
    num_tokens: int  # q rows computed (a burst: num_seqs * num_steps)
    num_used_pages: int
    num_kv_tokens: int  # K/V tokens the attention reads (sum of kv_lens over the steps)
    step_s: float
    schedule_s: float
    pack_s: float
    dispatch_s: float
    device_wait_s: float
    update_s: float
    num_steps: int = 1  # decode steps (1 unless a burst)
    num_sampled: int = 0  # output tokens kept


class Request:
    """A sequence plus its detokenizer and stop-string state."""

    def __init__(self, seq: Seq, detok: IncrementalDetokenizer | None) -> None:
        self.seq = seq
        self.detok = detok
        self.text = ""  # returned text: detokenized output, cut at a stop string
        params = seq.sampling_params
        # {token id: logprob} per output token / per prompt token (None for the first)
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * seq.num_prompt_tokens

    def record_logprobs(self, item: ScheduledSeq, row: int, out: StepOutput, offset: int) -> None:
        """Keep this step's logprobs of the request: ``row`` in the sampled arrays, ``offset``
        of its first packed token. Recomputed prompt positions overwrite the same values."""
        params = self.seq.sampling_params
        if self.prompt_logprobs is not None and out.prompt_logprobs is not None:
            p = out.prompt_logprobs
            last = min(item.kv_len, self.seq.num_prompt_tokens - 1)
            for pos in range(item.start_position, last):  # scores prompt token pos + 1
                j = offset + pos - item.start_position
                self.prompt_logprobs[pos + 1] = _entry(
                    p, j, self.seq.token_ids[pos + 1], params.prompt_logprobs
                )
        if self.logprobs is not None and item.sample and out.logprobs is not None:
            token_id = int(out.sampled[row])
            self.logprobs.append(_entry(out.logprobs, row, token_id, params.logprobs))

    def output(self) -> RequestOutput:
        seq = self.seq
        completion = CompletionOutput(
            index=0,
            text=self.text,
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=self.logprobs,
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=list(seq.prompt_token_ids),
            outputs=[completion],
            finished=seq.is_finished,
            metrics=seq.metrics(),
            prompt_logprobs=self.prompt_logprobs,
        )


def _entry(arrays: dict[str, Any], j: int, token_id: int, k: int) -> dict[int, float]:
    """Top-k {token id: logprob} of row ``j`` plus ``token_id``'s own."""
    entry = {
        int(t): float(v)
        for t, v in zip(arrays["top_ids"][j, :k], arrays["top"][j, :k], strict=True)
    }
    entry[token_id] = float(arrays["target"][j])
    return entry


def encode_prompt(
    tok: Tokenizer | None, vocab_size: int, prompt: Prompt, model: str
) -> tuple[str | None, list[int]]:
    """Text (when there is one) and token ids of one prompt; ValueError naming the problem."""
    if tok is None and not (
        isinstance(prompt, list | tuple) and prompt and isinstance(prompt[0], int)
    ):
        raise ValueError(f"model={model!r} has no tokenizer: prompts must be token ids")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt, tok.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        for i, message in enumerate(prompt):
            if not isinstance(message.get("role"), str) or "content" not in message:
                raise ValueError(f"messages[{i}] must have a 'role' and a 'content'")
        if tok.chat_template is None:
            raise ValueError("messages given, but the model has no chat template")
        text = tok.apply_chat_template(prompt, add_generation_prompt=True)
        return text, tok.encode(text, add_bos=False)
    if isinstance(prompt, list | tuple) and prompt:
        ids = list(prompt)
        vocab = vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt_token_ids[{i}]={t!r} is not a token id in [0, {vocab})")
        return None, ids
    raise ValueError(
        f"prompt must be a non-empty str, token id list or message list, got {prompt!r}"
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
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
    return params
