"""StepPlan: what one engine step computes, as decided by the scheduler and read by `pack`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceOf

from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.sequence import PLACEHOLDER, Sequence


@dataclasses.dataclass(slots=True)  # not frozen: built per sequence per step, frozen is 5x slower
class ScheduledSeq:
    """One sequence's share of a step: tokens [start_position, start_position + num_new_tokens).
    Read-only by convention.

    Everything ``pack`` needs is here, as snapshots taken at schedule time, so the runtime
    never reads the live ``seq`` (which the engine keeps for ``Scheduler.update``). sample is
    true only when the chunk reaches the end of the sequence's known tokens: its last logit
    then yields the next token, which will be output number `sample_position`.
    """

    seq: Sequence  # the engine's; the runtime reads the fields below only
    start_position: int
    num_new_tokens: int
    sample: bool
    token_ids: tuple[int, ...]  # the num_new_tokens tokens to compute
    # the page table covering start_position + num_new_tokens tokens: i32 ``array("i")`` from
    # the KV cache manager (``page_row``), or any sequence of ints
    page_ids: SequenceOf[int]
    sample_position: int  # len(output_token_ids) when scheduled
    params: SamplingParams
    seed: int  # the request's sampling seed (Sequence.seed)
    num_prompt_tokens: int
    # with prompt_logprobs: the prompt token after each new token that has one, else ()
    prompt_targets: tuple[int, ...] = ()
    request_id: str = ""  # for messages

    @property
    def kv_len(self) -> int:
        """Tokens of this sequence in the cache once this step has written its K/V."""
        return self.start_position + self.num_new_tokens


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Scheduled sequences in packing order (decodes, then continuing prefills, then newly
    admitted ones), and the sequences preempted while planning.

    A decode burst (``num_steps`` not empty) runs several decode steps in one round trip: every
    item is a one-token decode, and item i samples ``num_steps[i]`` tokens, feeding each back
    as the next step's input (its pages already cover them). The burst lasts
    ``max(num_steps)`` steps; a row whose own count is reached idles for the rest.
    """

    scheduled: tuple[ScheduledSeq, ...]
    preempted: tuple[Sequence, ...] = ()
    num_steps: tuple[int, ...] = ()  # per scheduled item; empty: one ordinary step
    # copy-on-write (src, dst) pages, copied on the device before this step writes K/V
    page_copies: tuple[tuple[int, int], ...] = ()

    @property
    def burst_len(self) -> int:
        """Decode steps this plan computes (1 for an ordinary step)."""
        return max(self.num_steps, default=1)

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def feed_rows(plan: StepPlan, previous: StepPlan | None) -> tuple[int, ...]:
    """Per row of ``plan``: the row of ``previous`` (the step still on the device) whose
    sampled token is this row's last input (a ``PLACEHOLDER`` when planned), else -1. Empty
    when no row needs one."""
    if previous is None:
        return ()
    rows = {item.seq.seq_id: row for row, item in enumerate(previous.scheduled)}
    out = tuple(
        rows[item.seq.seq_id] if item.token_ids[-1] == PLACEHOLDER else -1
        for item in plan.scheduled
    )
    return out if any(r >= 0 for r in out) else ()
