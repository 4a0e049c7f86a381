"""Continuous-batching scheduler: which sequences run each step, with how many tokens, and
which pages they get; applies each step's sampled tokens and decides when requests stop.

Policy (first come, first served). Each step has a token budget (max_num_batched_tokens) and
at most max_num_seqs sequences: running decodes first (1 token each), then running prefills
(chunked to fit the budget), then waiting requests in order (also chunked). A chunk also
shrinks to the tokens that free pages can hold. When a running sequence cannot get a page for
even one token, the most recently admitted running sequence is preempted by recompute (possibly
itself: then it just waits): its pages are freed, its outputs kept, and it goes back to the
front of the waiting queue to be recomputed as prompt + outputs. The oldest running sequence is
never a victim of another, so it always progresses. Admission leaves one free page per running
sequence, so that the next steps' decodes need not at once preempt the newcomer; no admission
happens in a step that preempted.

With ``decode_steps`` > 1 a decode-only plan may become a burst (``engine.burst``); ``update``
then applies each sequence's tokens in order and drops those past a stop, so the output is
token for token that of single steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as SequenceOf

from paged_jax.engine.burst import plan_burst
from paged_jax.engine.outputs import FinishReason
from paged_jax.engine.page_allocator import PageAllocator
from paged_jax.engine.plan import ScheduledSeq, StepPlan
from paged_jax.engine.sequence import Sequence, SequenceStatus, cdiv

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """reserve_full ("contiguous mode") makes each request reserve max_pages_per_seq pages at
    admission, the reservation scheme PagedAttention is compared against."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    page_size: int
    num_pages: int
    reserve_full: bool = False
    decode_steps: int = 1  # most decode steps per burst (1: no bursts)

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "page_size",
            "decode_steps",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if not isinstance(self.num_pages, int) or self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages!r} must be an int >= 2 (page 0 is null)")
        if self.max_pages_per_seq > self.num_pages - 1:
            raise ValueError(
                f"max_model_len={self.max_model_len} needs {self.max_pages_per_seq} pages of "
                f"page_size={self.page_size}, but num_pages={self.num_pages} leaves "
                f"{self.num_pages - 1} usable: at most {(self.num_pages - 1) * self.page_size} "
                "tokens would fit"
            )

    @property
    def max_pages_per_seq(self) -> int:
        return cdiv(self.max_model_len, self.page_size)


@dataclasses.dataclass
class _PlanBuilder:
    budget: int
    items: dict[int, ScheduledSeq] = dataclasses.field(default_factory=dict)  # by seq_id
    preempted: list[Sequence] = dataclasses.field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.allocator = PageAllocator(config.num_pages, config.page_size)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self._clock = clock
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # admission order: the last is the next victim
        self.num_preemptions = 0

    @property
    def num_waiting_seqs(self) -> int:
        return len(self._waiting)

    @property
    def num_running_seqs(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def add(self, seq: Sequence) -> None:
        num_tokens = seq.num_prompt_tokens
        if num_tokens == 0:
            raise ValueError(f"prompt_token_ids of request {seq.request_id!r} is empty")
        if num_tokens > self.config.max_model_len:
            raise ValueError(
                f"prompt_token_ids of request {seq.request_id!r} has {num_tokens} tokens, "
                f"more than max_model_len={self.config.max_model_len}"
            )
        if seq.status is not SequenceStatus.WAITING or seq.page_ids:
            raise ValueError(f"{seq!r} was already scheduled")
        self._waiting.append(seq)

    def schedule(self) -> StepPlan:
        builder = _PlanBuilder(budget=self.config.max_num_batched_tokens)
        decodes, prefills = [], []
        for seq in self._running:
            (decodes if seq.num_uncomputed_tokens == 1 else prefills).append(seq)
        for seq in decodes + prefills:
            if builder.budget == 0 or len(builder.items) == self.config.max_num_seqs:
                break
            if seq.status is SequenceStatus.RUNNING:  # else preempted earlier in this step
                self._schedule_running(seq, builder)
        if not builder.preempted:  # re-admitting now would only preempt again
            self._admit_waiting(builder)
        cfg = self.config
        return plan_burst(
            StepPlan(tuple(builder.items.values()), tuple(builder.preempted)),
            self.allocator,
            decode_steps=cfg.decode_steps,
            max_model_len=cfg.max_model_len,
            page_size=cfg.page_size,
        )

    def update(
        self, plan: StepPlan, sampled_token_ids: SequenceOf[int] | SequenceOf[SequenceOf[int]]
    ) -> list[Sequence]:
        """Apply a computed step. sampled_token_ids: per scheduled sequence in plan order, its
        sampled id (a burst: its ``burst_len`` ids, of which the first ``num_steps[i]`` count);
        entries of sequences with sample=False are ignored. Returns the sequences that finished
        in this step (their pages are already freed)."""
        if len(sampled_token_ids) != plan.num_seqs:
            raise ValueError(
                f"len(sampled_token_ids)={len(sampled_token_ids)} != plan.num_seqs={plan.num_seqs}"
            )
        now = self._clock()
        finished = []
        for row, (item, sampled) in enumerate(zip(plan.scheduled, sampled_token_ids, strict=True)):
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # finished by the caller since the plan was made
            assert seq.num_computed_tokens == item.start_position, (seq, item)
            seq.num_computed_tokens += item.num_new_tokens
            if not item.sample:
                continue
            token_ids = sampled[: plan.num_steps[row]] if plan.num_steps else [sampled]
            if seq.first_token_time is None:
                seq.first_token_time = now
            params = seq.sampling_params
            if params.stop_token_ids or (self.eos_token_ids and not params.ignore_eos):
                stop = None
                for j, token_id in enumerate(token_ids):  # token by token: an id may stop it
                    seq.num_computed_tokens += j > 0  # step j computed token j - 1's K/V
                    seq.append_token(token_id)
                    if stop := self._check_stop(seq, int(token_id)):
                        break
            else:  # only lengths stop it, and num_steps keeps them to the last token
                seq.token_ids.extend(int(t) for t in token_ids)
                seq.num_computed_tokens += len(token_ids) - 1
                stop = self._check_stop(seq, seq.token_ids[-1])
            if stop is not None:
                self._finish(seq, stop[0], stop[1], now)
                finished.append(seq)
        return finished

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        stop_reason: int | str | None = None,
        *,
        num_output_tokens: int | None = None,
    ) -> None:
        """Stop a request early (a stop string found by the caller, an abort): frees its pages.
        ``num_output_tokens`` also drops the outputs after that many (a stop string found
        inside a burst's tokens); then an already finished request takes the new reason."""
        if num_output_tokens is not None and num_output_tokens < seq.num_output_tokens:
            del seq.token_ids[seq.num_prompt_tokens + num_output_tokens :]
            seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
        if not seq.is_finished:
            self._finish(seq, reason, stop_reason, self._clock())
        elif num_output_tokens is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason

    def kv_utilization(self) -> float:
        """Tokens whose K/V is in the cache / capacity of the allocated pages (0.0 when none are
        allocated). Exact between steps, i.e. after `update`."""
        num_used_pages = self.allocator.num_used_pages
        if num_used_pages == 0:
            return 0.0
        num_cached_tokens = sum(s.num_computed_tokens for s in self._running)
        return num_cached_tokens / (num_used_pages * self.config.page_size)

    def _schedule_running(self, seq: Sequence, builder: _PlanBuilder) -> None:
        page_size = self.config.page_size
        while (num_fitting := seq.num_tokens_fitting(page_size, self.allocator.num_free_pages)) < 1:
            victim = self._running[-1]
            self._preempt(victim, builder)
            if victim is seq:
                return
        num_new_tokens = min(seq.num_uncomputed_tokens, builder.budget, num_fitting)
        self._schedule(seq, num_new_tokens, builder)

    def _admit_waiting(self, builder: _PlanBuilder) -> None:
        cfg = self.config
        while self._waiting and builder.budget > 0 and len(self._running) < cfg.max_num_seqs:
            seq = self._waiting[0]
            num_new_tokens = min(seq.num_uncomputed_tokens, builder.budget)
            if cfg.reserve_full:
                if not self.allocator.can_allocate(cfg.max_pages_per_seq):
                    break
                seq.page_ids = self.allocator.allocate(cfg.max_pages_per_seq)
            else:
                # Leave one free page per running sequence, so that the next step's decodes
                # need not preempt the newcomer right away.
                num_spare_pages = self.allocator.num_free_pages - len(self._running)
                num_fitting = seq.num_tokens_fitting(cfg.page_size, max(0, num_spare_pages))
                num_new_tokens = min(num_new_tokens, num_fitting)
                if num_new_tokens < 1:
                    break
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            self._schedule(seq, num_new_tokens, builder)

    def _schedule(self, seq: Sequence, num_new_tokens: int, builder: _PlanBuilder) -> None:
        token_ids = seq.token_ids
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        num_new_pages = cdiv(end, self.config.page_size) - len(seq.page_ids)
        if num_new_pages > 0:
            seq.page_ids.extend(self.allocator.allocate(num_new_pages))
        builder.items[seq.seq_id] = ScheduledSeq(
            seq=seq,
            start_position=start,
            num_new_tokens=num_new_tokens,
            sample=end == len(token_ids),
            token_ids=tuple(token_ids[start:end]),
            page_ids=tuple(seq.page_ids),
            sample_position=len(token_ids) - seq.num_prompt_tokens,
        )
        builder.budget -= num_new_tokens

    def _preempt(self, seq: Sequence, builder: _PlanBuilder) -> None:
        self._running.remove(seq)
        item = builder.items.pop(seq.seq_id, None)
        if item is not None:  # scheduled earlier in this step: give its tokens back
            builder.budget += item.num_new_tokens
        self.allocator.free(seq.page_ids)
        seq.page_ids = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)  # victims come newest first, so older ones end in front
        builder.preempted.append(seq)
        self.num_preemptions += 1
        logger.debug("preempted %r (%d preemptions so far)", seq, self.num_preemptions)

    def _check_stop(self, seq: Sequence, token_id: int) -> tuple[FinishReason, int | None] | None:
        params = seq.sampling_params
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return "stop", None
            if params.stop_token_ids and token_id in params.stop_token_ids:
                return "stop", token_id
        if seq.num_output_tokens >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.config.max_model_len:
            return "length", None
        return None

    def _finish(
        self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None, now: float
    ) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self._waiting:
            self._waiting.remove(seq)
        self.allocator.free(seq.page_ids)
        seq.page_ids = []
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.finished_time = now
