"""Decode bursts on the device: the next decode step's inputs made from this step's samples.

A burst runs the ordinary compiled step of its (T, S) bucket several times in a row. Between
two runs, ``advance`` (a tiny jitted function) turns step j's inputs and sampled ids into step
j + 1's inputs without the host: each live row feeds its sampled id back, moves one position
on, and writes its next K/V slot through its page table (the scheduler allocated the pages
for the whole burst). So the host packs once and reads the sampled ids once per burst, and
dispatches the steps back to back while the device works. A row whose own step count is
reached idles: same token, same position, K/V written into NULL_PAGE, its samples ignored.

With ``fused_bursts`` a burst of exactly ``decode_steps`` steps is instead one executable
(``make_fused``): a ``fori_loop`` whose body is the step, the token selection, ``keep_last`` and
``advance``. On a GPU every executable call costs the host about a microsecond per kernel
(XLA updates the call's CUDA graph whenever a buffer address moves), about as long as a small
model's step runs on the device; in a loop the host enqueues the burst once. The trip count is
static, so XLA does not read a loop predicate back to the host.

Rows: in a decode-only plan, q row i belongs to sequence i (one token each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from paged_jax.engine.kv_cache import NULL_PAGE
from paged_jax.runtime.feed import keep_last
from paged_jax.runtime.select import GREEDY, SELECT_INPUTS, SelectMode


class FusedBurst(NamedTuple):
    """The kind of a fused burst's ``ExecutableKey``: its token selection."""

    mode: SelectMode


# the selections a burst can have (bursts never return logprobs: engine.burst)
BURST_MODES = (GREEDY, SelectMode(True, False, False), SelectMode(True, True, False))


def advance(
    inputs: dict[str, jax.Array], sampled: jax.Array, step: jax.Array, *, page_size: int
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Inputs of burst step ``step + 1`` from those of ``step``; returns them and ``step + 1``.

    inputs: a decode-only plan's StepInputs arrays (``burst_steps``: the row's steps in the
    burst, 0 for padding rows; ``min_tokens``); sampled i32[S] (this step's samples); step i32[]
    (the step just computed, from 0).
    """
    num_steps, min_tokens = inputs["burst_steps"], inputs["min_tokens"]  # i32[S] each
    num_tokens = inputs["token_ids"].shape[0]
    num_rows = min(num_tokens, sampled.shape[0])  # rows that can hold a sequence

    def to_rows(x: jax.Array, fill: int | bool) -> jax.Array:  # [S] -> [T]
        return jnp.pad(x[:num_rows], (0, num_tokens - num_rows), constant_values=fill)

    live = step + 1 < num_steps  # bool[S]: the row computes step + 1
    kv_lens = inputs["kv_lens"] + live  # i32[S]
    sample_positions = inputs["sample_positions"] + live  # i32[S]
    pos = kv_lens - 1  # i32[S]: the position step + 1 computes
    page = jnp.take_along_axis(inputs["page_tables"], (pos // page_size)[:, None], axis=1)[:, 0]
    row_live = to_rows(live, False)  # bool[T]
    null_slots = NULL_PAGE * page_size + jnp.arange(num_tokens, dtype=jnp.int32) % page_size
    out = dict(inputs)
    out["token_ids"] = jnp.where(row_live, to_rows(sampled, 0), inputs["token_ids"])
    out["positions"] = jnp.where(row_live, to_rows(pos, 0), inputs["positions"])
    out["slot_mapping"] = jnp.where(
        row_live, to_rows(page * page_size + pos % page_size, 0), null_slots
    )
    out["kv_lens"] = kv_lens
    out["sample_positions"] = sample_positions
    out["suppress_eos"] = sample_positions < min_tokens
    return out, step + 1


def make_fused(
    step: Callable, select: Callable | None, *, num_steps: int, page_size: int
) -> Callable:
    """``fused(params, kv, inputs) -> (kv, tokens, last)``: a whole burst.

    ``step``: the (unjitted) step of ``runtime.step``; ``select``: the selector of the burst's
    mode (None: greedy, the step's argmax); ``num_steps``: the loop's trip count (the burst's
    length). The rows' own step counts are ``inputs["burst_steps"]`` (as ``advance`` reads
    them); tokens i32[S, K] (row i's sample of step j at [i, j]); last i32[S] (``keep_last``
    over the burst).
    """

    def fused(params: Any, kv: Any, inputs: dict[str, jax.Array]):
        steps = inputs["burst_steps"]  # i32[S]
        num_seqs = steps.shape[0]

        def body(j, carry):
            kv, inputs, tokens, last = carry
            kv, out = step(params, kv, inputs)
            sampled = out["greedy"]
            if select is not None:
                chosen = {k: inputs[k] for k in SELECT_INPUTS}
                sampled = select(out["logits"], out["logits"], sampled, chosen)["sampled"]
            sampled = sampled.astype(jnp.int32)
            tokens = jax.lax.dynamic_update_slice(tokens, sampled[:, None], (0, j))
            last = keep_last(last, sampled, j, steps)
            inputs, _ = advance(inputs, sampled, j, page_size=page_size)
            return kv, inputs, tokens, last

        tokens = jnp.zeros((num_seqs, num_steps), jnp.int32)  # i32[S, K]
        last = jnp.zeros(num_seqs, jnp.int32)  # i32[S]
        kv, _, tokens, last = jax.lax.fori_loop(0, num_steps, body, (kv, inputs, tokens, last))
        return kv, tokens, last

    return fused
