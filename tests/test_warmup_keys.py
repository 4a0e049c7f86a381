"""runtime.warmup.warmup_keys: which executables warmup compiles, for a small bucket set.

The engine tests check the outcome (no compile after warmup); these pin the list itself,
written out by hand for max_num_batched_tokens 32 and max_num_seqs 16
(token buckets 16, 32; sequence buckets 8, 16; one decode bucket, (16, 16)).
"""

from collections import Counter

from paged_jax.runtime.buckets import Buckets
from paged_jax.runtime.burst import BURST_MODES, FusedBurst
from paged_jax.runtime.dispatch import ExecutableKey
from paged_jax.runtime.folded import Folded
from paged_jax.runtime.warmup import warmup_keys

BUCKETS = Buckets.create(32, 16)


def kinds(keys: list[ExecutableKey]) -> Counter:
    return Counter(k.kind if isinstance(k.kind, str) else type(k.kind).__name__ for k in keys)


def test_plain_engine_keys():
    keys = warmup_keys(BUCKETS, fold_inputs=False, decode_variant=False, fused_burst_steps=False)
    reachable = BUCKETS.reachable()
    assert len(keys) == len(set(keys))
    assert [k[:2] for k in keys if k.kind == "plain"] == reachable
    assert [k[:2] for k in keys if k.kind == "unpack"] == reachable
    seqs = sorted({s for _, s in reachable})
    assert [k.num_seqs for k in keys if k.kind == "controls"] == seqs
    assert [k.num_seqs for k in keys if k.kind == "copy"] == list(BUCKETS.seq_buckets)
    selectors = [k for k in keys if not isinstance(k.kind, str)]
    assert len(selectors) == 3 * len(seqs)  # sampling, top-k/p sampling, greedy + logprobs
    assert not {"prompt", "decode", "advance", "widen", "keep", "unpack_feed"} & set(kinds(keys))


def test_folded_bursts_async_logprobs():
    keys = warmup_keys(
        BUCKETS, fold_inputs=True, decode_variant=True, fused_burst_steps=True,
        logprobs=True, decode_bursts=True, async_scheduling=True,
    )  # fmt: skip
    decode = BUCKETS.decode_buckets()
    assert len(keys) == len(set(keys))
    assert decode == [(16, 16)]
    assert not {"unpack", "unpack_feed", "prompt"} & set(kinds(keys))  # steps unpack themselves
    steps_32 = {k.kind.kind for k in keys if isinstance(k.kind, Folded) and k[:2] == (32, 16)}
    assert steps_32 == {"plain", "prompt"}
    folded = [k for k in keys if isinstance(k.kind, Folded)]
    assert {(k[:2], k.kind.kind) for k in folded if k.kind.kind == "decode"} == {
        (b, "decode") for b in decode if b[0] == b[1]
    }
    fused = {(k[:2], k.kind.kind.mode) for k in folded if isinstance(k.kind.kind, FusedBurst)}
    assert fused == {(b, mode) for b in decode for mode in BURST_MODES}
    assert [k[:2] for k in keys if k.kind == "advance"] == decode
    assert {k.num_seqs for k in keys if k.kind == "keep"} == {s for _, s in decode}
    assert [k.num_seqs for k in keys if k.kind == "widen"] == list(BUCKETS.seq_buckets)
    # the burst's further steps: the unfolded step variant of each decode bucket
    further = {k[:2] for k in keys if k.kind in ("plain", "decode")}
    assert further == set(decode)
