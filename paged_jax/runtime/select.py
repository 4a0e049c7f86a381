"""Token selection after the step: the random draw and logprobs, as separate small executables.

The step itself only takes the argmax (of the logits with EOS masked for rows under
min_tokens) and returns the raw logits. When every row is greedy and nobody wants logprobs,
that argmax is the answer and nothing else runs. Otherwise the runner calls one selector,
compiled per sequence bucket S and per ``SelectMode``, which the host picks from the requests'
sampling parameters. Keeping these choices static keeps the step free of ``lax.cond``, whose
predicate XLA reads back to the host on GPU, blocking dispatch until the device catches up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paged_jax.engine.plan import StepPlan
from paged_jax.engine.sampling_params import MAX_LOGPROBS
from paged_jax.model.layers import RowMap, all_rows
from paged_jax.model.sampler import sample

SELECT_INPUTS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seeds",
    "sample_positions",
    "suppress_eos",
)


class SelectMode(NamedTuple):
    draw: bool  # some row samples at temperature > 0
    use_filter: bool  # some such row sets top-k, top-p or min-p
    logprobs: bool  # some row wants logprobs of its sampled token


GREEDY = SelectMode(False, False, False)


def select_mode(plan: StepPlan) -> SelectMode:
    """The selector a plan needs (GREEDY: the step's argmax is enough)."""
    draw = use_filter = logprobs = False
    for item in plan.scheduled:
        if not item.sample:
            continue
        p = item.params
        if p.temperature > 0.0:
            draw = True
            use_filter |= p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0
        logprobs |= p.logprobs is not None
    return SelectMode(draw, use_filter, logprobs)


def mask_eos(logits: jax.Array, suppress_eos: jax.Array, eos_ids: jax.Array) -> jax.Array:
    """logits f32[S, V] with EOS ids at -inf in rows flagged suppress_eos bool[S]."""
    if not eos_ids.size:
        return logits
    no_eos = logits.at[:, eos_ids].set(-jnp.inf)
    return jnp.where(suppress_eos[:, None], no_eos, logits)


def top_logprobs(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Log-probabilities of ``targets`` and the MAX_LOGPROBS most likely tokens per row, and
    the target's rank (vLLM's: how many tokens are at least as likely; the top one is 1).

    logits f32[N, V]; targets i32[N] -> target f32[N], rank i32[N], top_ids i32[N, K],
    top f32[N, K]
    """
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top, top_ids = jax.lax.top_k(logprobs, MAX_LOGPROBS)
    target = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    rank = jnp.sum(logprobs >= target[:, None], axis=-1).astype(jnp.int32)
    return {"target": target, "rank": rank, "top_ids": top_ids.astype(jnp.int32), "top": top}


def make_select(
    mode: SelectMode,
    eos_token_ids: tuple[int, ...],
    vocab_size: int,
    rows: RowMap = all_rows,
) -> Callable:
    """``select(logits, raw, greedy, inputs) -> {"sampled", ["logprobs"]}`` for one mode.

    logits f32[S, V] (after ``runtime.controls`` when a row set some, else raw); raw f32[S, V]
    (the model's, which logprobs report, as vLLM's default "raw_logprobs"); greedy i32[S] (the
    argmax of ``logits``); inputs: the SELECT_INPUTS arrays of the step. ``rows``: the row
    map (``layers.row_tiles`` in batch-invariant mode: every row is independent here).
    """
    eos_ids = jnp.asarray([t for t in eos_token_ids if 0 <= t < vocab_size], jnp.int32)

    def select_rows(logits, raw, greedy, inputs):
        sampled = greedy
        if mode.draw:
            sampled = sample(
                mask_eos(logits, inputs["suppress_eos"], eos_ids),
                inputs["temperature"],
                inputs["top_k"],
                inputs["top_p"],
                inputs["min_p"],
                inputs["seeds"],
                inputs["sample_positions"],
                use_filter=mode.use_filter,
            )
        out = {"sampled": sampled}
        if mode.logprobs:  # under the raw model distribution
            out["logprobs"] = top_logprobs(raw, sampled)
        return out

    def select(logits: jax.Array, raw: jax.Array, greedy: jax.Array, inputs: dict[str, Any]):
        # inputs: the SELECT_INPUTS only, [S] each, so that every leaf splits into row tiles
        return rows(select_rows, logits, raw, greedy, inputs)

    return select
