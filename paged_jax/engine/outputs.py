"""What a finished (or streaming) request hands back to the user: vLLM-shaped plain dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclasses.dataclass
class RequestMetrics:
    """Times on one clock (the scheduler's, `time.monotonic` by default), in seconds."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclasses.dataclass
class Logprob:
    """vLLM's per-token log-probability entry: the value, the token's rank in the distribution
    (1 = most likely; how many tokens are at least as likely) and its text (None without a
    tokenizer). Log-probabilities are of the raw model distribution (vLLM's default
    ``raw_logprobs``: before penalties, masks and temperature)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    """One generated continuation. stop_reason: the stop token id or stop string that ended it
    (None when it ended on EOS, on length, or has not ended)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per token: top-k plus the sampled one
    cumulative_logprob: float | None = None  # sum of the sampled tokens' (with logprobs set)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # per prompt token: None for the first, then {token id: Logprob} of the top-k plus the
    # actual token (only when SamplingParams.prompt_logprobs is set)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclasses.dataclass
class BeamSequence:
    """One finished beam: generated text and token ids (a final EOS included), and its score
    (sum of log-probs / num_tokens ** length_penalty)."""

    text: str
    token_ids: list[int]
    score: float


@dataclasses.dataclass
class BeamSearchOutput:
    """``LLM.beam_search``'s result for one prompt: ``beam_width`` sequences, best first."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]
