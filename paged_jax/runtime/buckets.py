"""The fixed shapes the step compiles for: token buckets T and sequence buckets S.

T: powers of two from 16 up to max_num_batched_tokens, the budget itself being the last bucket
even if it is not a power of two (a step never pads past its budget). S: powers of two from 8 up
to max_num_seqs, likewise ending at max_num_seqs.
"""

from __future__ import annotations

import bisect
import dataclasses

MIN_TOKEN_BUCKET = 16
MIN_SEQ_BUCKET = 8


def power_of_two_buckets(limit: int, smallest: int) -> tuple[int, ...]:
    """Powers of two from `smallest` below `limit`, then `limit` itself."""
    if limit < 1:
        raise ValueError(f"{limit=} must be >= 1")
    buckets = []
    size = smallest
    while size < limit:
        buckets.append(size)
        size *= 2
    buckets.append(limit)
    return tuple(buckets)


@dataclasses.dataclass(frozen=True)
class Buckets:
    token_buckets: tuple[int, ...]  # ascending; the last is max_num_batched_tokens
    seq_buckets: tuple[int, ...]  # ascending; the last is max_num_seqs

    @classmethod
    def create(cls, max_num_batched_tokens: int, max_num_seqs: int) -> Buckets:
        return cls(
            token_buckets=power_of_two_buckets(max_num_batched_tokens, MIN_TOKEN_BUCKET),
            seq_buckets=power_of_two_buckets(max_num_seqs, MIN_SEQ_BUCKET),
        )

    def pick_bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """The smallest (T, S) with num_tokens <= T and num_seqs <= S."""
        if not 1 <= num_tokens <= self.token_buckets[-1]:
            raise ValueError(f"{num_tokens=} must be in [1, {self.token_buckets[-1]}]")
        if not 1 <= num_seqs <= self.seq_buckets[-1]:
            raise ValueError(f"{num_seqs=} must be in [1, {self.seq_buckets[-1]}]")
        num_tokens_bucket = self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]
        num_seqs_bucket = self.seq_buckets[bisect.bisect_left(self.seq_buckets, num_seqs)]
        return num_tokens_bucket, num_seqs_bucket

    def reachable(self) -> list[tuple[int, int]]:
        """The (T, S) pairs `pick_bucket` can return, for warmup. Every sequence schedules at
        least one token, so num_tokens >= num_seqs: a pair whose S is only picked for more
        sequences than T holds tokens is never used."""
        pairs = []
        for i, seqs in enumerate(self.seq_buckets):
            min_num_seqs = self.seq_buckets[i - 1] + 1 if i else 1
            for tokens in self.token_buckets:
                if tokens >= min_num_seqs:
                    pairs.append((tokens, seqs))
        return pairs


def pick_bucket(
    num_tokens: int, num_seqs: int, *, max_num_batched_tokens: int, max_num_seqs: int
) -> tuple[int, int]:
    """Shorthand for `Buckets.create(max_num_batched_tokens, max_num_seqs).pick_bucket(...)`."""
    return Buckets.create(max_num_batched_tokens, max_num_seqs).pick_bucket(num_tokens, num_seqs)
