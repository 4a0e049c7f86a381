"""Continuous-batching scheduler: which sequences run each step, with how many tokens, and
asks the KV cache manager for their pages; applies each step's sampled tokens and decides when
requests stop. It never touches page ids: ``engine.kv_cache`` owns them.

Policy (first come, first served). Each step has a token budget (max_num_batched_tokens) and
at most max_num_seqs sequences: running decodes first (1 token each), then running prefills
(chunked to fit the budget), then waiting requests in order (also chunked). A chunk also
shrinks to the tokens that free pages can hold. When a running sequence cannot get a page for
even one token, the most recently admitted running sequence is preempted by recompute (possibly
itself: then it just waits): its pages are freed, its outputs kept, and it goes back to the
front of the waiting queue to be recomputed as prompt + outputs. The oldest running sequence is
never a victim of another, so it always progresses. Admission leaves one free page per running
sequence, so that the next steps' decodes need not at once preempt the newcomer; no admission
happens in a step that preempted. With prefix caching, an admitted sequence starts past the
longest chain of cached pages of its tokens, so only the rest is computed (and counted
against the budget); a preempted sequence's full pages stay cached, so its recompute hits.

Groups (n > 1 completions, beams; ``SequenceGroup``) are admitted and preempted whole: the
leader prefills the prompt but its last token, then every member is forked off its pages and
computes the rest itself; the first write into a shared page copies it (copy-on-write: the
plan carries the copies). A group is admitted only when all its members fit max_num_seqs.
The group checks, counting and forks are ``engine.groups`` (a mixin, as ``step_updates``).

With ``decode_steps`` > 1 a decode-only plan may become a burst (``engine.burst``); ``update``
then applies each sequence's tokens in order and drops those past a stop, so the output is
token for token that of single steps.

Applying a step is ``engine.step_updates`` (``launch`` / ``resolve``). With async scheduling a
running sequence's last token may be a ``PLACEHOLDER`` (sampled by the step in flight): it
schedules as a decode, and not at all when that token is its last (a length stop).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

from paged_jax.engine.burst import plan_burst
from paged_jax.engine.groups import GroupForking, num_members_of
from paged_jax.engine.kv_cache import KVCacheManager
from paged_jax.engine.outputs import FinishReason
from paged_jax.engine.plan import ScheduledSeq, StepPlan
from paged_jax.engine.sequence import (
    PLACEHOLDER,
    Sequence,
    SequenceStatus,
    check_stop,
)
from paged_jax.engine.step_updates import StepUpdates

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """reserve_full ("contiguous mode") makes each request reserve max_model_len tokens of
    pages at admission, the reservation scheme PagedAttention is compared against."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    reserve_full: bool = False
    decode_steps: int = 1  # most decode steps per burst (1: no bursts)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")


@dataclasses.dataclass
class _PlanBuilder:
    budget: int
    items: dict[int, ScheduledSeq] = dataclasses.field(default_factory=dict)  # by seq_id
    preempted: list[Sequence] = dataclasses.field(default_factory=list)


class Scheduler(GroupForking, StepUpdates):
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        max_pages = kv_cache.pages_for(config.max_model_len)
        if max_pages > kv_cache.num_usable_pages:
            raise ValueError(
                f"max_model_len={config.max_model_len} needs {max_pages} pages of "
                f"page_size={kv_cache.page_size}, but num_pages={kv_cache.num_pages} leaves "
                f"{kv_cache.num_usable_pages} usable: at most "
                f"{kv_cache.capacity(kv_cache.num_usable_pages)} tokens would fit"
            )
        if config.reserve_full and kv_cache.enable_prefix_caching:
            raise ValueError(
                "reserve_full=True (contiguous reservation) shares no pages: "
                "set enable_prefix_caching=False with it"
            )
        self.config = config
        self.kv_cache = kv_cache
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
        if seq.status is not SequenceStatus.WAITING or self.kv_cache.num_pages_of(seq):
            raise ValueError(f"{seq!r} was already scheduled")
        if seq.group is not None:
            group = seq.group
            num_members = group.params.beam_width if group.is_beam else len(group.members)
            self.check_group_size(num_members)
            name = "beam_width" if group.is_beam else "n"
            max_tokens = seq.sampling_params.max_tokens
            self.check_group_fits(num_tokens, max_tokens, num_members, name)
            seq = seq.group.prepare_prefill()
        self._waiting.append(seq)

    def schedule(self) -> StepPlan:
        builder = _PlanBuilder(budget=self.config.max_num_batched_tokens)
        for seq in list(self._running):
            if self._ready_to_fork(seq):
                self._fork_group(seq)
        decodes, prefills, cfg = [], [], self.config
        for seq in self._running:
            (decodes if seq.num_schedulable_tokens == 1 else prefills).append(seq)
        for seq in decodes + prefills:
            if builder.budget == 0 or len(builder.items) == self.config.max_num_seqs:
                break
            if seq.status is SequenceStatus.RUNNING and not _awaits_last_token(seq, cfg):
                self._schedule_running(seq, builder)  # else preempted earlier in this step
        if not builder.preempted:  # re-admitting now would only preempt again
            self._admit_waiting(builder)
        plan = plan_burst(
            StepPlan(tuple(builder.items.values()), tuple(builder.preempted)),
            self.kv_cache,
            decode_steps=cfg.decode_steps,
            max_model_len=cfg.max_model_len,
        )
        copies = self.kv_cache.take_copies()
        return dataclasses.replace(plan, page_copies=copies) if copies else plan

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
        """Tokens whose K/V is in the cache / capacity of the pages in use (0.0 when none are);
        a shared page counts once. Exact between steps, i.e. after `update`."""
        kv = self.kv_cache
        if kv.num_used_pages == 0:
            return 0.0
        return kv.num_filled_tokens / kv.capacity(kv.num_used_pages)

    def _schedule_running(self, seq: Sequence, builder: _PlanBuilder) -> None:
        if seq.num_schedulable_tokens < 1:
            assert seq.num_schedulable_tokens == 0, seq
            return  # a parked beam, or a leader whose group forks at the next step
        while (num_fitting := self.kv_cache.num_tokens_fitting(seq)) < 1:
            self._preempt(self._running[-1], builder)
            if seq.status is not SequenceStatus.RUNNING:
                return  # preempted itself (or its group)
        num_new_tokens = min(seq.num_schedulable_tokens, builder.budget, num_fitting)
        self._schedule(seq, num_new_tokens, builder)

    def _admit_waiting(self, builder: _PlanBuilder) -> None:
        cfg = self.config
        while self._waiting and builder.budget > 0:
            seq, kv = self._waiting[0], self.kv_cache
            num_members = num_members_of(seq)
            if self._num_running_slots() + num_members > cfg.max_num_seqs:
                break
            if cfg.reserve_full:
                if not kv.can_allocate([], cfg.max_model_len):
                    break
                num_new_tokens = min(seq.num_schedulable_tokens, builder.budget)
                kv.allocate(seq, [], cfg.max_model_len)
            else:
                hit = kv.match_prefix(seq)
                num_hit_tokens = kv.capacity(len(hit))
                # Leave one free page per running sequence, so that the next step's decodes
                # need not preempt the newcomer right away.
                num_fitting = kv.num_admissible_tokens(hit, num_spare_pages=len(self._running))
                num_wanted = seq.num_schedulable_tokens - num_hit_tokens
                num_new_tokens = min(num_wanted, builder.budget, num_fitting)
                if num_new_tokens < 1 and num_wanted > 0:
                    break
                seq.num_computed_tokens = kv.allocate(seq, hit, num_hit_tokens + num_new_tokens)
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            if num_new_tokens > 0:
                self._schedule(seq, num_new_tokens, builder)
            elif self._ready_to_fork(seq):  # the prompt was cached (or is one token long)
                for member in self._fork_group(seq):
                    self._schedule_if_fits(member, builder)

    def _schedule_if_fits(self, seq: Sequence, builder: _PlanBuilder) -> None:
        """Schedule what fits of a just-forked member, preempting nobody."""
        if builder.budget == 0 or len(builder.items) == self.config.max_num_seqs:
            return
        num_new_tokens = min(
            seq.num_schedulable_tokens, builder.budget, self.kv_cache.num_tokens_fitting(seq)
        )
        if num_new_tokens > 0:
            self._schedule(seq, num_new_tokens, builder)

    def _schedule(self, seq: Sequence, num_new_tokens: int, builder: _PlanBuilder) -> None:
        token_ids, params = seq.token_ids, seq.sampling_params
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        page_ids = self.kv_cache.append(seq, num_new_tokens)
        targets = ()
        if params.prompt_logprobs is not None:  # token p + 1 is scored at position p
            targets = tuple(token_ids[start + 1 : min(end, seq.num_prompt_tokens - 1) + 1])
        builder.items[seq.seq_id] = ScheduledSeq(
            seq=seq,
            start_position=start,
            num_new_tokens=num_new_tokens,
            sample=end == len(token_ids),
            token_ids=tuple(token_ids[start:end]),
            page_ids=page_ids,
            sample_position=len(token_ids) - seq.num_prompt_tokens,
            params=params,
            seed=seq.seed,
            num_prompt_tokens=seq.num_prompt_tokens,
            prompt_targets=targets,
            request_id=seq.request_id,
        )
        builder.budget -= num_new_tokens

    def _preempt(self, victim: Sequence, builder: _PlanBuilder) -> None:
        """Preempt by recompute: the victim (its whole group) gives its pages back and goes
        to the front of the waiting queue."""
        group = victim.group
        seqs = [victim] if group is None else group.unfinished
        for seq in seqs:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # a member not forked yet
            self._running.remove(seq)
            item = builder.items.pop(seq.seq_id, None)
            if item is not None:  # scheduled earlier in this step: give its tokens back
                builder.budget += item.num_new_tokens
            self.kv_cache.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
            seq.num_preemptions += 1
            builder.preempted.append(seq)
            self.num_preemptions += 1
            logger.debug("preempted %r (%d preemptions so far)", seq, self.num_preemptions)
        queued = victim if group is None else group.prepare_prefill()
        self._waiting.appendleft(queued)  # victims come newest first: older ones end in front

    def _check_stop(self, seq: Sequence, token_id: int) -> tuple[FinishReason, int | None] | None:
        return check_stop(seq, token_id, self.eos_token_ids, self.config.max_model_len)

    def _finish(
        self, seq: Sequence, reason: FinishReason, stop_reason: int | str | None, now: float
    ) -> None:
        queued_at = None
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self._waiting:
            queued_at = self._waiting.index(seq)
            del self._waiting[queued_at]
        self.kv_cache.free(seq)
        if seq.token_ids[-1] == PLACEHOLDER:  # a step in flight samples a token it discards
            seq.token_ids.pop()
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.finished_time = now
        if queued_at is not None and seq.group is not None and seq.group.unfinished:
            self._waiting.insert(queued_at, seq.group.prepare_prefill())  # the next leader


def _awaits_last_token(seq: Sequence, config: SchedulerConfig) -> bool:
    """The token a step in flight samples for ``seq`` is its last (a length stop): nothing
    to schedule for it."""
    if seq.token_ids[-1] != PLACEHOLDER:
        return False
    return (
        seq.num_output_tokens >= seq.sampling_params.max_tokens
        or seq.num_tokens >= config.max_model_len
    )
