"""One request's token stream, its page table and its progress through the KV cache."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Iterable

from paged_jax.engine.outputs import FinishReason, RequestMetrics
from paged_jax.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no pages (new, or preempted)
    RUNNING = enum.auto()  # admitted, holds pages
    FINISHED = enum.auto()  # done, pages returned


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Sequence:
    """Prompt and output tokens of one request, and which of them have KV in the cache.

    Invariant: tokens [0, num_computed_tokens) have their K/V in the pages `page_ids`
    (token at position p lives in page page_ids[p // page_size], offset p % page_size).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: SamplingParams,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.seq_id = next(_seq_ids)
        self.prompt = prompt
        self.token_ids: list[int] = [int(t) for t in prompt_token_ids]  # prompt + outputs
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.page_ids: list[int] = []  # this sequence's page table
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None

    def __repr__(self) -> str:
        return (
            f"Sequence(request_id={self.request_id!r}, seq_id={self.seq_id}, "
            f"status={self.status.name}, num_tokens={self.num_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens}, num_pages={len(self.page_ids)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens whose K/V is not in the cache yet (1 for a sequence in decode)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def all_token_ids(self) -> list[int]:
        return list(self.token_ids)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_pages_needed(self, page_size: int, num_tokens: int | None = None) -> int:
        """Pages that hold `num_tokens` tokens (default: all known tokens)."""
        return cdiv(self.num_tokens if num_tokens is None else num_tokens, page_size)

    def num_new_pages_needed(self, page_size: int, num_new_tokens: int) -> int:
        """Pages to add so that `num_new_tokens` more tokens fit after the computed ones."""
        total = self.num_pages_needed(page_size, self.num_computed_tokens + num_new_tokens)
        return max(0, total - len(self.page_ids))

    def num_tokens_fitting(self, page_size: int, num_free_pages: int) -> int:
        """How many more tokens fit in this sequence's pages plus `num_free_pages` new ones."""
        return (len(self.page_ids) + num_free_pages) * page_size - self.num_computed_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))

    def metrics(self) -> RequestMetrics:
        return RequestMetrics(self.arrival_time, self.first_token_time, self.finished_time)
