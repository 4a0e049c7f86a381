"""Decode bursts on the host side: when a plan may run several decode steps in one round trip.

A plan of one-token decodes only (nothing admitted, no prefill chunk, no preemption, no logprobs
asked for, no grammar or bad words: their token masks are made on the host per token) becomes a
burst of up to ``decode_steps`` steps. Each sequence is capped by its own max_tokens and
max_model_len (so a length stop can only fall on its last token), and the pages
for all its burst tokens are allocated up front; when free pages cannot cover the burst, it is
halved, down to an ordinary step. The device side is ``runtime.burst``.
"""

from __future__ import annotations

from paged_jax.engine.kv_cache import KVCacheManager
from paged_jax.engine.plan import StepPlan


def plan_burst(
    plan: StepPlan, kv_cache: KVCacheManager, *, decode_steps: int, max_model_len: int
) -> StepPlan:
    """The plan as a decode burst when it qualifies and free pages allow (else unchanged)."""
    items = plan.scheduled
    if decode_steps < 2 or plan.preempted or not items:
        return plan
    for item in items:
        params = item.params
        if item.num_new_tokens != 1 or not item.sample:
            return plan
        if params.logprobs is not None or params.prompt_logprobs is not None:
            return plan
        if params.needs_mask_per_step:  # the host makes its token mask after every token
            return plan
    caps = [
        min(
            item.params.max_tokens - item.seq.num_output_tokens,
            max_model_len - item.seq.num_tokens,
        )
        for item in items
    ]  # tokens each sequence may still sample (>= 1 while it runs)
    burst = decode_steps
    while burst > 1:
        steps = [max(1, min(burst, cap)) for cap in caps]
        # Step j writes the K/V of position kv_len - 1 + j: n steps write n tokens.
        extra = [kv_cache.num_pages_to_append(i.seq, n) for i, n in zip(items, steps, strict=True)]
        if sum(extra) <= kv_cache.num_free_pages:
            break
        burst //= 2
    if burst < 2 or max(steps) < 2:
        return plan
    for item, n, num_extra in zip(items, steps, extra, strict=True):
        if num_extra:  # the items are this schedule call's own: updated in place
            item.page_ids = kv_cache.append(item.seq, n)
    return StepPlan(items, plan.preempted, tuple(steps))
