"""One request's token stream and its progress through the KV cache (its pages belong to the
KV cache manager)."""

from __future__ import annotations

import enum
import itertools
import time
import zlib
from collections.abc import Iterable

from paged_jax.engine.outputs import FinishReason, RequestMetrics
from paged_jax.engine.sampling_params import SamplingParams

_seq_ids = itertools.count()
# An output token a launched step is sampling, not yet read back (``Scheduler.launch``); the
# next step's input there is fed on the device from that step's samples (``runtime.feed``).
PLACEHOLDER = -1
_UINT32_MASK = 0xFFFFFFFF


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # queued, holds no pages (new, or preempted)
    RUNNING = enum.auto()  # admitted, holds pages
    FINISHED = enum.auto()  # done, pages returned


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def completion_seed(seed: int, index: int) -> int:
    """The seed of completion ``index`` of a request seeded ``seed`` (n > 1): completion i
    draws exactly as a lone request with ``SamplingParams(seed=completion_seed(seed, i))``
    would; completion 0 keeps the request's own seed."""
    if index == 0:
        return seed & _UINT32_MASK
    return zlib.crc32(f"completion/{index}".encode(), seed & _UINT32_MASK)


class SequenceGroup:
    """The completions (n > 1) or beams of one request: admitted and preempted together.

    The prompt is prefilled once, by the first unfinished member (the leader) up to its last
    token; then every unfinished member is forked off the leader's pages (``forked``) and each
    computes the last prompt token and its own outputs. Preemption takes the whole group back
    to that state; its members keep their outputs.
    """

    is_beam = False  # beams: the group picks each next token (engine.beam)

    def __init__(self, members: list[Sequence]) -> None:
        self.members = members
        self.forked = False
        for seq in members:
            seq.group = self

    @property
    def unfinished(self) -> list[Sequence]:
        return [s for s in self.members if not s.is_finished]

    @property
    def leader(self) -> Sequence:
        return self.unfinished[0]

    def prepare_prefill(self) -> Sequence:
        """Reset to "leader prefills the prompt, then fork"; returns the leader."""
        self.forked = False
        unfinished = self.unfinished
        leader = unfinished[0]
        leader.prefill_limit = leader.num_prompt_tokens - 1 if len(unfinished) > 1 else None
        return leader


class Sequence:
    """Prompt and output tokens of one request, and which of them have KV in the cache.

    Invariant: tokens [0, num_computed_tokens) have their K/V in the pages of its page table
    (``KVCacheManager.page_table(seq)``).

    ``seed`` is the request's seed, or for an unseeded request a fixed value derived from its
    request id and the engine's ``default_seed`` (completion ``index`` of n > 1 then takes
    ``completion_seed``): the sampler keys each draw on (seed, output index) only, so a
    request's tokens do not depend on the batch around it.

    ``prefill_limit``: while set, the scheduler computes no token at or past it (a group's
    leader prefills its prompt but the last token, then the group forks).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: SamplingParams,
        *,
        prompt: str | None = None,
        arrival_time: float | None = None,
        default_seed: int = 0,
        index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.seq_id = next(_seq_ids)
        self.prompt = prompt
        self.token_ids: list[int] = [int(t) for t in prompt_token_ids]  # prompt + outputs
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        if sampling_params.seed is not None:
            seed = sampling_params.seed & _UINT32_MASK
        else:
            seed = zlib.crc32(request_id.encode(), default_seed & _UINT32_MASK)
        self.index = index  # completion (or beam) index within its request
        self.seed = completion_seed(seed, index)
        self.group: SequenceGroup | None = None
        self.prefill_limit: int | None = None
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
            f"num_computed_tokens={self.num_computed_tokens})"
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
    def num_schedulable_tokens(self) -> int:
        """Uncomputed tokens the scheduler may compute now (stops at ``prefill_limit``)."""
        end = len(self.token_ids) if self.prefill_limit is None else self.prefill_limit
        return end - self.num_computed_tokens

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

    def fork(self, token_id: int) -> Sequence:
        """A new sequence with this one's tokens plus ``token_id`` (a beam's second child); it
        holds no pages yet (the KV cache manager shares them) and computed nothing."""
        child = Sequence(self.request_id, self.prompt_token_ids, self.sampling_params,
                         prompt=self.prompt, arrival_time=self.arrival_time)  # fmt: skip
        child.token_ids = [*self.token_ids, int(token_id)]
        child.first_token_time = self.first_token_time
        return child

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))

    def metrics(self) -> RequestMetrics:
        return RequestMetrics(self.arrival_time, self.first_token_time, self.finished_time)


def check_stop(
    seq: Sequence,
    token_id: int,
    eos_token_ids: frozenset[int],
    max_model_len: int,
    num_tokens: int | None = None,
) -> tuple[FinishReason, int | None] | None:
    """Why ``seq`` stops after its newest token ``token_id`` (reason, stop_reason), or None.
    ``num_tokens``: the sequence's length with that token (default: all of its tokens)."""
    params = seq.sampling_params
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    num_output_tokens = num_tokens - seq.num_prompt_tokens
    if num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            return "stop", None
        if params.stop_token_ids and token_id in params.stop_token_ids:
            return "stop", token_id
    if num_output_tokens >= params.max_tokens:
        return "length", None
    if num_tokens >= max_model_len:
        return "length", None
    return None
