"""The benchmark's workloads: plain numpy, so that the HF baseline (``scripts/bench_hf.py``)
draws exactly the same requests as ``paged-jax bench`` (``paged_jax.bench``).

``sharegpt``: ShareGPT-like lognormal lengths and random prompt ids; ``shared-prefix``: the
PagedAttention paper's translation test, one shared few-shot prefix plus each request's own
short query; or the requests of a JSONL file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from paged_jax.io.jsonl import json_objects

# Lognormal lengths, rounded and clipped to [MIN_LEN, MAX_LEN]: exp(N(log(median), sigma^2)).
# After clipping the means are about 148 prompt and 297 output tokens (ShareGPT-like: outputs
# about twice the prompts, long right tails; 0.5% of prompts and 3% of outputs hit MAX_LEN).
PROMPT_LEN_MEDIAN = 100
PROMPT_LEN_SIGMA = 0.9
OUTPUT_LEN_MEDIAN = 225
OUTPUT_LEN_SIGMA = 0.8
MIN_LEN = 4
MAX_LEN = 1024
JSONL_MAX_TOKENS = 256  # a JSONL line without max_tokens (and no --max-tokens) gets this
# shared-prefix workload: the paper's translation test (Fig. 16): ~80-token (1-shot) or
# ~340-token (5-shot) prefix, each request's own ~20-token query, 20-60 output tokens
QUERY_LEN_RANGE = (16, 24)
SHARED_OUTPUT_RANGE = (20, 60)

Workload = list[tuple[Any, int]]  # (prompt token ids, or text for a tokenizer model; max_tokens)


def make_workload(
    num_requests: int, seed: int = 0, *, vocab_size: int = 32000, max_len: int = MAX_LEN
) -> list[tuple[list[int], int]]:
    """``num_requests`` (prompt token ids, max_tokens) pairs, deterministic for ``seed``.

    Prefix-stable: the first k requests are the same whatever ``num_requests`` is (lengths are
    drawn row by row, each prompt from its own ``(seed, i)`` stream), so a baseline may run a
    slice of the same workload. ``max_len`` clips both lengths (keep 2 * max_len <= the model
    length); ids are uniform in [0, vocab_size).
    """
    if num_requests < 1 or max_len < MIN_LEN or vocab_size < 1:
        raise ValueError(
            f"{num_requests=} must be >= 1, {max_len=} >= {MIN_LEN}, {vocab_size=} >= 1"
        )
    rng = np.random.default_rng(seed)
    mu = np.log([PROMPT_LEN_MEDIAN, OUTPUT_LEN_MEDIAN])
    draws = rng.lognormal(mu, [PROMPT_LEN_SIGMA, OUTPUT_LEN_SIGMA], size=(num_requests, 2))
    lengths = np.clip(np.rint(draws), MIN_LEN, max_len).astype(np.int64)
    workload = []
    for i, (prompt_len, output_len) in enumerate(lengths.tolist()):
        ids = np.random.default_rng([seed, i]).integers(0, vocab_size, prompt_len)
        workload.append((ids.tolist(), output_len))
    return workload


def make_shared_prefix_workload(
    num_requests: int, seed: int = 0, *, vocab_size: int = 32000, prefix_len: int = 80
) -> list[tuple[list[int], int]]:
    """``num_requests`` requests = one shared ``prefix_len``-token prefix + an own query of
    16-24 tokens, max_tokens 20-60; deterministic and prefix-stable like ``make_workload``."""
    if num_requests < 1 or prefix_len < 0 or vocab_size < 1:
        raise ValueError(f"{num_requests=} must be >= 1, {prefix_len=} >= 0, {vocab_size=} >= 1")
    prefix = np.random.default_rng([seed, 1 << 20]).integers(0, vocab_size, prefix_len).tolist()
    workload = []
    for i in range(num_requests):
        rng = np.random.default_rng([seed, i])
        query = rng.integers(0, vocab_size, int(rng.integers(*QUERY_LEN_RANGE, endpoint=True)))
        max_tokens = int(rng.integers(*SHARED_OUTPUT_RANGE, endpoint=True))
        workload.append((prefix + query.tolist(), max_tokens))
    return workload


def read_jsonl(path: str, max_tokens: int | None) -> Workload:
    """Requests of a JSONL file: ``prompt_token_ids`` or ``prompt`` (text), optional
    ``max_tokens``. ValueError naming the line for anything else."""
    workload: Workload = []
    for number, record in json_objects(Path(path).read_text(), path):
        has = [k for k in ("prompt_token_ids", "prompt") if k in record]
        if len(has) != 1:
            raise ValueError(f"{path}:{number}: needs exactly one of 'prompt_token_ids', 'prompt'")
        n = max_tokens or record.get("max_tokens", JSONL_MAX_TOKENS)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{path}:{number}: max_tokens={n!r} must be an int >= 1")
        workload.append((record[has[0]], n))
    if not workload:
        raise ValueError(f"{path} holds no requests")
    return workload


def workload_summary(prompt_lens: list[int], output_lens: list[int]) -> dict[str, Any]:
    def one(lens: list[int]) -> dict[str, float]:
        a = np.asarray(lens)
        return {"mean": float(a.mean()), "p50": float(np.median(a)), "max": int(a.max())}

    return {
        "num_requests": len(prompt_lens),
        "prompt_tokens": int(sum(prompt_lens)),
        "output_tokens": int(sum(output_lens)),
        "prompt_len": one(prompt_lens),
        "output_len": one(output_lens),
    }
