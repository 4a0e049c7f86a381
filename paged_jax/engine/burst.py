"""Decode bursts on the host side: when a plan may run several decode steps in one round trip.

A plan of one-token decodes only (nothing admitted, no prefill chunk, no preemption, no logprobs
asked for) becomes a burst of up to ``decode_steps`` steps. Each sequence is capped by its own
max_tokens and max_model_len (so a length stop can only fall on its last token), and the pages
for all its burst tokens are allocated up front; when free pages cannot cover the burst, it is
halved, down to an ordinary step. The device side is ``runtime.burst``.
"""

from __future__ import annotations

import dataclasses

from paged_jax.engine.page_allocator import PageAllocator
from paged_jax.engine.plan import StepPlan
from paged_jax.engine.sequence import cdiv


def plan_burst(
    plan: StepPlan,
    allocator: PageAllocator,
    *,
    decode_steps: int,
    max_model_len: int,
    page_size: int,
) -> StepPlan:
    """The plan as a decode burst when it qualifies and free pages allow (else unchanged)."""
    items = plan.scheduled
    if decode_steps < 2 or plan.preempted or not items:
        return plan
    for item in items:
        params = item.seq.sampling_params
        if item.num_new_tokens != 1 or not item.sample:
            return plan
        if params.logprobs is not None or params.prompt_logprobs is not None:
            return plan
    caps = [
        min(
            item.seq.sampling_params.max_tokens - item.seq.num_output_tokens,
            max_model_len - item.seq.num_tokens,
        )
        for item in items
    ]  # tokens each sequence may still sample (>= 1 while it runs)
    burst = decode_steps
    while burst > 1:
        steps = [max(1, min(burst, cap)) for cap in caps]
        # Step j writes the K/V of position kv_len - 1 + j.
        extra = [
            max(0, cdiv(item.kv_len - 1 + n, page_size) - len(item.page_ids))
            for item, n in zip(items, steps, strict=True)
        ]
        if sum(extra) <= allocator.num_free_pages:
            break
        burst //= 2
    if burst < 2 or max(steps) < 2:
        return plan
    scheduled = []
    for item, num_extra in zip(items, extra, strict=True):
        if num_extra:
            item.seq.page_ids.extend(allocator.allocate(num_extra))
            item = dataclasses.replace(item, page_ids=tuple(item.seq.page_ids))
        scheduled.append(item)
    return StepPlan(tuple(scheduled), plan.preempted, tuple(steps))
