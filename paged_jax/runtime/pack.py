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

    page_tables = np.full((S, max_pages_per_seq), NULL_PAGE, np.int32)
    page_ids: list[int] = []  # every row's page table, concatenated
    num_pages_per_row: list[int] = []
    token_ids: list[int] = []
    targets = np.zeros(T, np.int32)  # i32[T]
    per_seq: list[tuple] = []  # per sequence: q_len, kv_len, sampling values
    for item in plan.scheduled:
        num_pages = len(item.page_ids)
        if num_pages > max_pages_per_seq:
            raise ValueError(
                f"request {item.request_id!r} holds {num_pages} pages, more than "
                f"{max_pages_per_seq=}"
            )
        if item.kv_len > num_pages * page_size:
            raise ValueError(f"request {item.request_id!r}: kv_len {item.kv_len} exceeds pages")
        token_ids.extend(item.token_ids)
        if item.prompt_targets:
            start = len(token_ids) - item.num_new_tokens
            targets[start : start + len(item.prompt_targets)] = item.prompt_targets
        page_ids.extend(item.page_ids)
        num_pages_per_row.append(num_pages)
        params = item.params
        per_seq.append(
            (
                item.num_new_tokens,
                item.kv_len,
                params.temperature,
                params.top_k,
                params.top_p,
                params.min_p,
                item.seed,
                item.sample_position,
                item.sample,
                item.sample_position < params.min_tokens,
            )
        )
    columns = list(zip(*per_seq, strict=True)) if per_seq else [()] * 10
    # One scatter for all page tables: row r's pages go to columns 0..len-1.
    row_lens = np.asarray(num_pages_per_row, np.int64)  # i64[num_seqs]
    table_rows = np.repeat(np.arange(num_seqs), row_lens)
    table_cols = np.arange(len(page_ids)) - np.repeat(np.cumsum(row_lens) - row_lens, row_lens)
    page_tables[table_rows, table_cols] = page_ids

    def column(index: int, dtype: type, pad: float) -> np.ndarray:
        out = np.full(S, pad, dtype)  # [S]
        out[:num_seqs] = columns[index]
        return out

    q_lens = column(0, np.int32, 0)
    kv_lens = column(1, np.int32, 0)
    temperature = column(2, np.float32, 0.0)
    top_k = column(3, np.int32, -1)
    top_p = column(4, np.float32, 1.0)
    min_p = column(5, np.float32, 0.0)
    seeds = column(6, np.uint32, 0)
    sample_positions = column(7, np.int32, 0)
    do_sample = column(8, np.bool_, False)
    suppress_eos = column(9, np.bool_, False)

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
    )
