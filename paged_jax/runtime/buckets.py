"""The fixed shapes the step compiles for: token buckets T and sequence buckets S.

T: powers of two from 16 up to max_num_batched_tokens, the budget itself being the last bucket
even if it is not a power of two (a step never pads past its budget). S: powers of two from 8 up
to max_num_seqs, likewise ending at max_num_seqs.

S is tied to T: a step of T tokens gets the smallest S bucket holding min(T, max_num_seqs)
sequences (it can never have more, since each sequence schedules at least one token). So
there is one compiled step per token bucket (8 for a 2048 budget, not 40), and padding rows
cost only their metadata: attention and sampling skip rows past num_seqs.
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
        """The smallest T with num_tokens <= T, and the S bucket tied to it."""
        if not 1 <= num_tokens <= self.token_buckets[-1]:
            raise ValueError(f"{num_tokens=} must be in [1, {self.token_buckets[-1]}]")
        if not 1 <= num_seqs <= min(num_tokens, self.seq_buckets[-1]):
            raise ValueError(f"{num_seqs=} must be in [1, min({num_tokens=}, max_num_seqs)]")
        num_tokens_bucket = self.token_buckets[bisect.bisect_left(self.token_buckets, num_tokens)]
        return num_tokens_bucket, self.seqs_for(num_tokens_bucket)

    def seqs_for(self, num_tokens_bucket: int) -> int:
        """The S bucket compiled with token bucket T: holds min(T, max_num_seqs) sequences."""
        wanted = min(num_tokens_bucket, self.seq_buckets[-1])
        return self.seq_buckets[bisect.bisect_left(self.seq_buckets, wanted)]

    def decode_buckets(self) -> list[tuple[int, int]]:
        """The (T, S) of every decode-only plan (one token per sequence), for burst warmup."""
        most = min(self.token_buckets[-1], self.seq_buckets[-1])
        sizes = sorted({t for t in self.token_buckets if t <= most} | {most, 1})
        return sorted({self.pick_bucket(n, n) for n in sizes})

    def reachable(self) -> list[tuple[int, int]]:
        """Every (T, S) `pick_bucket` can return, for warmup: one per token bucket."""
        return [(t, self.seqs_for(t)) for t in self.token_buckets]


def pick_bucket(
    num_tokens: int, num_seqs: int, *, max_num_batched_tokens: int, max_num_seqs: int
) -> tuple[int, int]:
    """Shorthand for `Buckets.create(max_num_batched_tokens, max_num_seqs).pick_bucket(...)`."""
    return Buckets.create(max_num_batched_tokens, max_num_seqs).pick_bucket(num_tokens, num_seqs)
