"""`pack`: the one place host data becomes arrays. Turns a StepPlan into padded numpy arrays of
one bucket's fixed shapes (T tokens, S sequences), ready to hand to the jitted step.

Padding: tokens past the plan's total have token id 0, position 0, and slots inside NULL_PAGE;
sequence rows past num_seqs have cu_q_lens repeating the last value, kv_len 0, a page table of
NULL_PAGE, logits index 0 and do_sample False.

Sampling: each row carries its request's seed and the output index of the token it samples
(sample_positions). The sampler derives its key from (seed, sample_position) only, so a seeded
request yields the same tokens whatever the batch, bucket or preemptions around it. Unseeded
requests carry a seed derived from their request id (``engine.sequence``).

Only the plan's ``ScheduledSeq`` snapshots are read, never the live sequences.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from paged_jax.engine.kv_cache import NULL_PAGE
from paged_jax.engine.plan import StepPlan


@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]  page * page_size + offset
    cu_q_lens: np.ndarray  # i32[S + 1]
    kv_lens: np.ndarray  # i32[S]  tokens in the cache, this step's included
    page_tables: np.ndarray  # i32[S, max_pages_per_seq]
    num_seqs: np.ndarray  # i32[1]
    logits_indices: np.ndarray  # i32[S]  each sequence's last scheduled token in T
    temperature: np.ndarray  # f32[S]  0 = greedy
    top_k: np.ndarray  # i32[S]  -1 = off
    top_p: np.ndarray  # f32[S]  1 = off
    min_p: np.ndarray  # f32[S]  0 = off
    seeds: np.ndarray  # u32[S]
    sample_positions: np.ndarray  # i32[S]  output index the sampled token will have
    do_sample: np.ndarray  # bool[S]
    suppress_eos: np.ndarray  # bool[S]  fewer than min_tokens outputs yet: EOS ids masked
    target_ids: np.ndarray  # i32[T]  the next prompt token (scored by prompt_logprobs), else 0
    min_tokens: np.ndarray  # i32[S]  the request's min_tokens (a burst re-derives suppress_eos)
    burst_steps: np.ndarray  # i32[S]  a burst: the row's steps in it; else 1; padding rows 0


def column(values: list, size: int, dtype: type, pad: float) -> np.ndarray:
    """values padded with ``pad`` to [size]."""
    out = np.full(size, pad, dtype)
    out[: len(values)] = values
    return out


def _page_ids(items: tuple) -> np.ndarray:
    """Every row's page ids end to end: the rows' i32 buffers joined (``KVCacheManager.
    page_row`` snapshots), or the ints one by one when a row is a tuple or list."""
    try:
        return np.frombuffer(b"".join(i.page_ids for i in items), np.int32)
    except TypeError:
        flat = itertools.chain.from_iterable(i.page_ids for i in items)
        return np.fromiter(flat, np.int32, sum(len(i.page_ids) for i in items))


def pack(
    plan: StepPlan,
    *,
    num_tokens_bucket: int,
    num_seqs_bucket: int,
    page_size: int,
    max_pages_per_seq: int,
) -> StepInputs:
    num_seqs = plan.num_seqs
    num_tokens = plan.num_tokens
    if num_tokens > num_tokens_bucket:
        raise ValueError(f"plan has {num_tokens} tokens, more than {num_tokens_bucket=}")
    if num_seqs > num_seqs_bucket:
        raise ValueError(f"plan has {num_seqs} sequences, more than {num_seqs_bucket=}")
    T, S = num_tokens_bucket, num_seqs_bucket

    items = plan.scheduled
    # One pass per column over the items (list comprehensions), then numpy: no per-row numpy.
    num_pages_per_row = np.fromiter((len(i.page_ids) for i in items), np.int64, num_seqs)
    q_lens = column([i.num_new_tokens for i in items], S, np.int32, 0)
    kv_lens = column([i.start_position + i.num_new_tokens for i in items], S, np.int32, 0)
    if num_seqs and (num_pages_per_row.max() > max_pages_per_seq):
        row = int(np.argmax(num_pages_per_row > max_pages_per_seq))
        raise ValueError(
            f"request {items[row].request_id!r} holds {num_pages_per_row[row]} pages, more "
            f"than {max_pages_per_seq=}"
        )
    over = kv_lens[:num_seqs] > num_pages_per_row * page_size
    if over.any():
        row = int(np.argmax(over))
        raise ValueError(f"request {items[row].request_id!r}: kv_len {kv_lens[row]} exceeds pages")
    page_ids = _page_ids(items)  # i32[sum of the rows' pages]
    token_ids = list(itertools.chain.from_iterable(i.token_ids for i in items))
    targets = np.zeros(T, np.int32)  # i32[T]
    if any(i.prompt_targets for i in items):
        offset = 0
        for item in items:
            if item.prompt_targets:
                targets[offset : offset + len(item.prompt_targets)] = item.prompt_targets
            offset += item.num_new_tokens
    params = [i.params for i in items]
    temperature = column([p.temperature for p in params], S, np.float32, 0.0)
    top_k = column([p.top_k for p in params], S, np.int32, -1)
    top_p = column([p.top_p for p in params], S, np.float32, 1.0)
    min_p = column([p.min_p for p in params], S, np.float32, 0.0)
    seeds = column([i.seed for i in items], S, np.uint32, 0)
    sample_positions = column([i.sample_position for i in items], S, np.int32, 0)
    do_sample = column([i.sample for i in items], S, np.bool_, False)
    min_tokens = column([p.min_tokens for p in params], S, np.int32, 0)
    suppress_eos = (sample_positions < min_tokens) & (np.arange(S) < num_seqs)
    burst_steps = column(list(plan.num_steps) or [1] * num_seqs, S, np.int32, 0)

    # One scatter for all page tables: row r's pages go to columns 0..len-1.
    page_tables = np.full((S, max_pages_per_seq), NULL_PAGE, np.int32)
    row_lens = num_pages_per_row  # i64[num_seqs]
    table_rows = np.repeat(np.arange(num_seqs), row_lens)
    table_cols = np.arange(len(page_ids)) - np.repeat(np.cumsum(row_lens) - row_lens, row_lens)
    page_tables[table_rows, table_cols] = page_ids

    cu_q_lens = np.zeros(S + 1, np.int32)  # i32[S + 1]; padding rows repeat the last value
    np.cumsum(q_lens, out=cu_q_lens[1:])
    logits_indices = np.where(np.arange(S) < num_seqs, cu_q_lens[1:] - 1, 0).astype(np.int32)

    # Each real token's row and position; positions run from kv_len - q_len to kv_len - 1.
    rows = np.repeat(np.arange(num_seqs, dtype=np.int32), q_lens[:num_seqs])  # i32[num_tokens]
    offsets = np.arange(num_tokens, dtype=np.int32) - cu_q_lens[rows]
    real_positions = kv_lens[rows] - q_lens[rows] + offsets
    real_slots = page_tables[rows, real_positions // page_size] * page_size + (
        real_positions % page_size
    )

    positions = np.zeros(T, np.int32)
    positions[:num_tokens] = real_positions
    # Padding tokens write into NULL_PAGE, spread over its slots.
    slot_mapping = (NULL_PAGE * page_size + np.arange(T, dtype=np.int32) % page_size).astype(
        np.int32
    )
    slot_mapping[:num_tokens] = real_slots
    token_array = np.zeros(T, np.int32)
    token_array[:num_tokens] = token_ids

    return StepInputs(
        token_ids=token_array,
        positions=positions,
        slot_mapping=slot_mapping,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_tables=page_tables,
        num_seqs=np.array([num_seqs], np.int32),
        logits_indices=logits_indices,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seeds=seeds,
        sample_positions=sample_positions,
        do_sample=do_sample,
        suppress_eos=suppress_eos,
        target_ids=targets,
        min_tokens=min_tokens,
        burst_steps=burst_steps,
    )
