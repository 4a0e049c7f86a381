"""Engine metrics: one ``StepRecord`` per step, the counters, and the KV-token accounting.

What ``LLM.stats()``, ``paged-jax bench``, the CLI summary, notebooks and scripts read; the
driver is its only writer (``record``). Prefix-cache counters are the KV cache manager's and
are read here; ``reset`` zeroes both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from paged_jax.engine.kv_cache import KVCacheManager
from paged_jax.engine.plan import StepPlan


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
    num_table_pages: int = 0  # pages the sequences would hold without sharing
    idle_s: float = 0.0  # the device waited for the host at most this long (paged_jax.stepper)


@dataclasses.dataclass
class StepTimes:
    """One step record's perf_counter start and end (the previous record's end while the
    engine steps on), its host seconds planning and applying outputs, the runner's (pack,
    dispatch, device wait) seconds, and the device's idle seconds waiting for the host."""

    start: float
    end: float
    schedule_s: float
    update_s: float
    runner: tuple[float, float, float]
    idle_s: float = 0.0


class EngineMetrics:
    """Counters and the timeline of one engine; ``record`` is called once per step."""

    def __init__(self, kv_cache: KVCacheManager) -> None:
        self.kv_cache = kv_cache
        self.reset()

    def reset(self) -> None:
        self.timeline: list[StepRecord] = []
        self.steps = 0
        self.scheduled_tokens = 0
        self.output_tokens = 0
        self.seconds = 0.0
        self.kv_utilization_sum = 0.0
        self.num_preemptions = 0
        self.prompt_tokens_computed = 0  # prompt positions whose K/V a step computed
        kv = self.kv_cache
        kv.num_queries = kv.num_hits = kv.num_evictions = 0

    def record(
        self, plan: StepPlan, num_sampled: int, kv_utilization: float, times: StepTimes
    ) -> None:
        """Counters and one StepRecord for a step (a burst counts as one record)."""
        burst = plan.burst_len
        computed = plan.num_tokens
        kv_tokens = sum(i.kv_len for i in plan.scheduled)
        self.prompt_tokens_computed += sum(
            max(0, min(i.kv_len, i.num_prompt_tokens) - i.start_position) for i in plan.scheduled
        )
        if plan.num_steps:  # every row computes each step; idle rows re-read their K/V
            computed = plan.num_seqs * burst
            # step j reads kv_len + min(j, n - 1) tokens of a row with n steps
            kv_tokens = sum(
                burst * i.kv_len + n * (n - 1) // 2 + (burst - n) * (n - 1)
                for i, n in zip(plan.scheduled, plan.num_steps, strict=True)
            )
        self.seconds += times.end - times.start
        self.steps += burst
        self.kv_utilization_sum += burst * kv_utilization
        self.output_tokens += num_sampled
        self.scheduled_tokens += computed
        self.num_preemptions += len(plan.preempted)
        pack_s, dispatch_s, wait_s = times.runner
        self.timeline.append(
            StepRecord(
                time=times.end,
                num_seqs=plan.num_seqs,
                num_tokens=computed,
                num_used_pages=self.kv_cache.num_used_pages,
                num_kv_tokens=kv_tokens,
                step_s=times.end - times.start,
                schedule_s=times.schedule_s,
                pack_s=pack_s,
                dispatch_s=dispatch_s,
                device_wait_s=wait_s,
                update_s=times.update_s,
                num_steps=burst,
                num_sampled=num_sampled,
                num_table_pages=self.kv_cache.num_table_pages,
                idle_s=times.idle_s,
            )
        )

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def stats(self) -> dict[str, Any]:
        kv = self.kv_cache
        return {
            "steps": self.steps,
            "scheduled_tokens": self.scheduled_tokens,
            "output_tokens": self.output_tokens,
            "seconds": self.seconds,
            "output_tokens_per_s": self.output_tokens_per_s,
            "preemptions": self.num_preemptions,
            "prompt_tokens_computed": self.prompt_tokens_computed,
            "kv_utilization": self.kv_utilization_sum / self.steps if self.steps else 0.0,
            "num_pages": kv.num_pages,
            "page_size": kv.page_size,
            "free_pages": kv.num_free_pages,
            "used_pages": kv.num_used_pages,
            "cached_pages": kv.num_cached_pages,
            "prefix_cache_queries": kv.num_queries,
            "prefix_cache_hits": kv.num_hits,
            "prefix_cache_hit_rate": kv.num_hits / kv.num_queries if kv.num_queries else 0.0,
            "prefix_cache_evictions": kv.num_evictions,
            # pages saved by sharing, over the steps: 1 - pages in use / pages without sharing
            "kv_sharing_saving": self.sharing_saving(),
        }

    def sharing_saving(self) -> float:
        used = sum(r.num_used_pages for r in self.timeline)
        unshared = sum(r.num_table_pages for r in self.timeline)
        return 1.0 - used / unshared if unshared else 0.0
