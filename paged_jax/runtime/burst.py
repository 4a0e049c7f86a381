"""Decode bursts on the device: the next decode step's inputs made from this step's samples.

A burst runs the ordinary compiled step of its (T, S) bucket several times in a row. Between
two runs, ``advance`` (a tiny jitted function) turns step j's inputs and sampled ids into step
j + 1's inputs without the host: each live row feeds its sampled id back, moves one position
on, and writes its next K/V slot through its page table (the scheduler allocated the pages
for the whole burst). So the host packs once and reads the sampled ids once per burst, and
dispatches the steps back to back while the device works. A row whose own step count is
reached idles: same token, same position, K/V written into NULL_PAGE, its samples ignored.

Rows: in a decode-only plan, q row i belongs to sequence i (one token each).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from paged_jax.engine.kv_cache import NULL_PAGE


def advance(
    inputs: dict[str, jax.Array],
    sampled: jax.Array,
    num_steps: jax.Array,
    min_tokens: jax.Array,
    step: jax.Array,
    *,
    page_size: int,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Inputs of burst step ``step + 1`` from those of ``step``; returns them and ``step + 1``.

    inputs: a decode-only plan's StepInputs arrays; sampled i32[S] (this step's samples);
    num_steps i32[S] (the row's steps in the burst, 0 for padding rows); min_tokens i32[S];
    step i32[] (the step just computed, from 0).
    """
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
