"""A step dispatched to the device and not read back yet, and what reading it back gives.

``ModelRunner.start`` returns an ``InFlight``; ``select`` adds its token selection (when the
host made the token masks while the step ran) and ``fetch`` waits for it. Between the two the
host is free: the driver plans and packs the next step then (``async_scheduling``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from paged_jax.engine.plan import StepPlan


class StepOutput(NamedTuple):
    sampled: np.ndarray  # i32[num_seqs]; a burst: i32[num_seqs, burst_len]
    logprobs: dict[str, np.ndarray] | None  # target f32[n], top_ids i32[n, K], top f32[n, K]
    prompt_logprobs: dict[str, np.ndarray] | None  # the same per packed token [num_tokens]


@dataclasses.dataclass(eq=False)
class InFlight:
    plan: StepPlan
    bucket: tuple[int, int]  # (T, S)
    inputs: dict[str, jax.Array]  # the step's (a burst: its first step's)
    step: Any  # the step executable (a burst calls it again)
    out: dict[str, jax.Array] | None = None  # the step's latest outputs
    sampled: list[jax.Array] = dataclasses.field(default_factory=list)  # i32[S] per step
    last: jax.Array | None = None  # i32[S]: each row's last sample (a burst: its own last step)
    last_wide: bool = False  # ``last`` is already i32[S_max] (``runtime.folded``)
    last_exact: bool = False  # ``last`` is that (a burst without ``feeds_bursts``: not)
    fused: bool = False  # a fused burst (runtime.burst.make_fused): ``sampled`` is [i32[S, K]]
    logprobs: dict[str, jax.Array] | None = None
    prompt: dict[str, jax.Array] | None = None
    enqueued: float = 0.0  # perf_counter when its first device work was enqueued
    previous_ready: bool = True  # the step it was fed from had finished by then
    pack_s: float = 0.0
    dispatch_s: float = 0.0
    wait_s: float = 0.0
    idle_s: float = 0.0  # the device's wait for the host before it (the driver's estimate)

    def ready(self) -> bool:
        """The device finished it (its last output is ready); never blocks."""
        last = self.sampled[-1] if self.sampled else self.out["logits"]
        return last.is_ready()


def source_rows(cu_q_lens: np.ndarray, rows: tuple[int, ...], num_tokens: int) -> np.ndarray:
    """i32[T]: at each row's last token, the previous step's row that feeds it (else -1).

    cu_q_lens i32[S + 1] of the packed plan; rows: per plan row, a row or -1.
    """
    out = np.full(num_tokens, -1, np.int32)
    rows_arr = np.asarray(rows, np.int32)
    fed = np.nonzero(rows_arr >= 0)[0]
    out[cu_q_lens[fed + 1] - 1] = rows_arr[fed]
    return out
