"""Host milliseconds per step record of schedule / pack + wire / launch / resolve, without a
model: a scheduler over 256 sequences (prompts of 50-700 tokens), bursts of ``decode_steps``,
fake sampled tokens. Mixed records are the steps while prompts are still being prefilled.

    python scripts/bench_host.py [decode_steps] [-p]   # -p: cProfile 30 records
    python scripts/bench_host.py 8 -r                  # cProfile of resolve only
    python scripts/bench_host.py 8 -m                  # cProfile of the mixed (prefill) records
"""

import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax.engine.kv_cache import KVCacheManager
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.engine.scheduler import Scheduler, SchedulerConfig
from paged_jax.engine.sequence import Sequence
from paged_jax.runtime.dispatch import _as_dict
from paged_jax.runtime.pack import pack
from paged_jax.runtime.wire import to_wire

S, STEPS = 256, int(sys.argv[1]) if len(sys.argv) > 1 else 8
rng = np.random.default_rng(0)
kv = KVCacheManager(200000, 16, enable_prefix_caching=True)
sch = Scheduler(
    SchedulerConfig(
        max_num_seqs=S, max_num_batched_tokens=2048, max_model_len=2048, decode_steps=STEPS
    ),
    kv,
)
for i in range(S):
    n = int(rng.integers(50, 700))
    sch.add(
        Sequence(
            f"r{i}",
            rng.integers(3, 30000, n).tolist(),
            SamplingParams(max_tokens=1000, ignore_eos=True, temperature=0.0),
        )
    )


def one(timing=None):
    t0 = time.perf_counter()
    plan = sch.schedule()
    t1 = time.perf_counter()
    h = pack(
        plan,
        num_tokens_bucket=max(2048, plan.num_tokens),
        num_seqs_bucket=S,
        page_size=16,
        max_pages_per_seq=128,
    )
    to_wire(_as_dict(h))
    t2 = time.perf_counter()
    sch.launch(plan)
    t3 = time.perf_counter()
    toks = [[7] * plan.burst_len for _ in plan.scheduled] if plan.num_steps else [7] * plan.num_seqs
    sch.resolve(plan, toks)
    t4 = time.perf_counter()
    if timing is not None:
        timing.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3, plan.num_steps != ()))
    return plan


M = []
prof = cProfile.Profile() if "-m" in sys.argv else None
while any(s.num_schedulable_tokens > 1 for s in sch._running) or sch.num_waiting_seqs:
    if prof:
        prof.enable()
    one(M)
    if prof:
        prof.disable()
m = np.array([t[:4] for t in M]) * 1e3
print(
    f"mixed records ({len(M)}): schedule {np.median(m[:, 0]):.3f} pack+wire "
    f"{np.median(m[:, 1]):.3f} launch {np.median(m[:, 2]):.3f} resolve {np.median(m[:, 3]):.3f} ms"
)
if prof:
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
T = []
for _ in range(60):
    one(T)
a = np.array([t[:4] for t in T]) * 1e3
print(
    f"decode records (bursts {sum(t[4] for t in T)}/60): "
    f"schedule {np.median(a[:, 0]):.3f} pack+wire {np.median(a[:, 1]):.3f} "
    f"launch {np.median(a[:, 2]):.3f} resolve {np.median(a[:, 3]):.3f} ms"
)
if "-p" in sys.argv:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(30):
        one()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
if "-r" in sys.argv:
    pr = cProfile.Profile()
    for _ in range(30):
        plan = sch.schedule()
        sch.launch(plan)
        toks = (
            [[7] * plan.burst_len for _ in plan.scheduled]
            if plan.num_steps
            else [7] * plan.num_seqs
        )
        pr.enable()
        sch.resolve(plan, toks)
        pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)
