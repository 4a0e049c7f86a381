"""End-to-end offline throughput benchmark (``paged-jax bench``, ``scripts/bench_throughput.py``).

Owns the synthetic workloads (``sharegpt``: ShareGPT-like lognormal lengths, random prompt
ids; ``shared-prefix``: the PagedAttention paper's translation test, one shared few-shot prefix
plus each request's own short query), the run of one ``LLM.generate`` over it, the metrics
(throughput, TTFT/TPOT percentiles, KV use over time, prefix-cache hits, host overhead,
decode MBU against the streaming limit measured in the same run, ``runtime.bandwidth``) and
the JSON / markdown / PNG writers.
The workload makers are plain numpy so that the HF baseline (``scripts/bench_hf.py``) draws
exactly the same requests; jax and the engine are imported inside the functions that need them.

Conventions (vLLM's offline throughput benchmark): every request arrives at t=0, decodes
greedily with ``ignore_eos`` to exactly its own ``max_tokens``; TTFT therefore includes queueing.

Engine options come as in the CLI: a yaml ``--config`` (base_config chaining) and ``key=value``
overrides, over the bench's own defaults (``BENCH_DEFAULTS``); ``--contiguous`` and
``--no-prefix-caching`` are shorthands.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from paged_jax.io.jsonl import json_objects

logger = logging.getLogger(__name__)

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
WARMUP_PROMPT_LEN = 16
WARMUP_MAX_TOKENS = 8
# shared-prefix workload: the paper's translation test (Fig. 16): ~80-token (1-shot) or
# ~340-token (5-shot) prefix, each request's own ~20-token query, 20-60 output tokens
QUERY_LEN_RANGE = (16, 24)
SHARED_OUTPUT_RANGE = (20, 60)
BENCH_DEFAULTS: dict[str, Any] = {
    "model": "random:llama2-7b",
    "dtype": "bfloat16",
    "max_num_seqs": 256,
    "max_num_batched_tokens": 2048,
    "max_model_len": 2048,
}

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


def _dist(values: Any, percentiles: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, **{f"p{p}": None for p in percentiles}}
    out = {"mean": float(a.mean())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in percentiles})
    return out


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


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


def _timeline_metrics(llm: Any, limit_bytes_per_s: float | None) -> dict[str, Any]:
    """Host overhead, per-step cost components and decode MBU from ``llm.timeline``."""
    steps, stats = llm.timeline, llm.stats()
    parts = ("schedule_s", "pack_s", "dispatch_s", "device_wait_s", "update_s")
    step_s = np.array([r.step_s for r in steps])
    num_steps = sum(r.num_steps for r in steps)  # engine steps (a burst has several)
    sums = {p: float(np.sum([getattr(r, p) for r in steps])) for p in parts}
    sums["other_s"] = float(step_s.sum()) - sum(sums.values())
    means = {p: v / num_steps for p, v in sums.items()}  # per engine step
    # Host-only time: the device waited for the host (``StepRecord.idle_s``, an upper bound;
    # without async scheduling about schedule + pack + update + other). Host work is the
    # host's own share, hidden behind the device's when async scheduling overlaps them.
    host_s = float(np.sum([r.idle_s for r in steps]))
    work_s = sums["schedule_s"] + sums["pack_s"] + sums["update_s"] + sums["other_s"]
    # A decode step reads every weight once except the embedding table, of which it gathers
    # a few rows (tied embeddings are read whole, as the lm head).
    weight_bytes = stats["param_bytes"]
    if not llm.model_config.tie_word_embeddings:
        weight_bytes -= stats["embed_bytes"]
    kv_bytes_per_token = stats["kv_bytes_per_token"]
    # Decode-only records: one-token steps and bursts (a burst's counts add up its steps).
    decode = [r for r in steps if r.num_tokens == r.num_seqs * r.num_steps]
    decode_bytes = sum(
        r.num_steps * weight_bytes + r.num_kv_tokens * kv_bytes_per_token for r in decode
    )
    decode_s = sum(r.step_s for r in decode)
    device_s = sum(r.dispatch_s + r.device_wait_s for r in decode)
    mbu = mbu_device = None
    if decode and limit_bytes_per_s:
        # tensor parallel: against the devices' summed limit (replicated params counted once)
        limit_bytes_per_s *= llm.config.tensor_parallel_size
        mbu = decode_bytes / decode_s / limit_bytes_per_s
        mbu_device = decode_bytes / device_s / limit_bytes_per_s
    # where the device waited: bursts, single decode steps, steps with prefill tokens; with
    # the host's own seconds in each (schedule, pack, dispatch, update)
    fields = ("step_s", "idle_s", "schedule_s", "pack_s", "dispatch_s", "update_s")
    by_kind = {k: dict.fromkeys(("records", *fields), 0) for k in ("burst", "decode", "mixed")}
    for r in steps:
        kind = "burst" if r.num_steps > 1 else "decode" if r.num_tokens == r.num_seqs else "mixed"
        by_kind[kind]["records"] += 1
        for f in fields:
            by_kind[kind][f] += getattr(r, f)
    return {
        "host_overhead_share": host_s / float(step_s.sum()),
        "idle_by_kind": by_kind,
        "host_work_share": max(0.0, work_s) / float(step_s.sum()),
        "dispatch_share": sums["dispatch_s"] / float(step_s.sum()),
        "step_mean_s": float(step_s.sum()) / num_steps,
        "step_component_mean_s": means,
        "biggest_step_costs": sorted(means, key=means.__getitem__, reverse=True)[:3],
        "decode": {
            "steps": sum(r.num_steps for r in decode),
            "bursts": sum(r.num_steps > 1 for r in decode),
            "step_s": _dist([r.step_s / r.num_steps for r in decode]),
            "mean_num_seqs": float(np.mean([r.num_seqs for r in decode])) if decode else 0.0,
            "weight_bytes_per_step": int(weight_bytes),
            "kv_bytes_per_token": int(kv_bytes_per_token),
            "bytes_per_s": decode_bytes / decode_s if decode else None,
            "mbu": mbu,  # (weight + K/V bytes read) / step time / streaming limit
            "mbu_device": mbu_device,  # the same over dispatch + device wait only
        },
    }


def _series(llm: Any, start: float, max_points: int = 120) -> dict[str, list[float]]:
    """The timeline in time bins (about 5 steps each, at most ``max_points``): tokens/s, pages
    in use, sequences; None for a bin without steps."""
    steps = llm.timeline
    t = np.array([r.time - start for r in steps])
    num_bins = max(1, min(max_points, len(steps) // 5))
    edges = np.linspace(0.0, max(float(t[-1]), 1e-9), num_bins + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    width = np.diff(edges)

    def per_bin(values: list[float], reduce: str) -> list[float | None]:
        v = np.asarray(values, dtype=np.float64)
        sums, counts = np.bincount(idx, v, len(width)), np.bincount(idx, None, len(width))
        out = (
            sums / width
            if reduce == "rate"
            else np.where(counts, sums / np.maximum(counts, 1), np.nan)
        )
        return _finite([round(float(x), 4) for x in out])

    num_pages = llm.stats()["num_pages"]
    return {
        "t_s": [round(float(x), 4) for x in edges[1:]],
        "tokens_per_s": per_bin([r.num_tokens for r in steps], "rate"),
        "output_tokens_per_s": per_bin([r.num_sampled for r in steps], "rate"),
        "used_pages_frac": per_bin([r.num_used_pages / num_pages for r in steps], "mean"),
        "num_seqs": per_bin([r.num_seqs for r in steps], "mean"),
    }


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """BENCH_DEFAULTS, then the ``--config`` yaml chain, then ``key=value`` overrides, then the
    shorthand flags (``--model``, ``--contiguous``, ``--no-prefix-caching``)."""
    from paged_jax.config import parse_overrides, read_yaml_chain

    options = dict(BENCH_DEFAULTS)
    if args.config:
        options.update(read_yaml_chain(Path(args.config)))
    options.update(parse_overrides(args.overrides))
    if args.model:
        options["model"] = args.model
    if args.contiguous:
        options.update(reserve_full=True, enable_prefix_caching=False)
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    return options


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark described by ``args`` (see ``build_parser``); returns the result dict
    (its ``series`` holds the binned timeline for the plot)."""
    import jax

    from paged_jax import LLM, SamplingParams

    jsonl = read_jsonl(args.input, args.max_tokens) if args.input else None  # fail fast
    from paged_jax.runtime.bandwidth import streaming_limit

    copy = None
    num_bytes = args.copy_bytes
    if num_bytes is None:  # >= 4 GiB where it is measured for real
        num_bytes = 4 * 2**30 if jax.default_backend() in ("gpu", "tpu") else 2**28
    if num_bytes > 0:  # before the engine takes its KV budget of the free memory
        copy = streaming_limit(num_bytes, calls=args.copy_runs)
        logger.info("streaming limit: %.1f GB/s (%s)", copy["bytes_per_s"] / 1e9, copy["method"])
    start = time.perf_counter()
    options = engine_options(args)
    llm = LLM(**options)
    init_s = time.perf_counter() - start
    vocab = llm.model_config.vocab_size
    max_model_len = llm.scheduler_config.max_model_len
    if jsonl is None and args.workload == "shared-prefix":
        workload = make_shared_prefix_workload(
            args.num_requests or 1000, args.seed, vocab_size=vocab, prefix_len=args.prefix_len
        )
        if args.max_tokens:
            workload = [(p, args.max_tokens) for p, _ in workload]
    elif jsonl is None:
        max_len = min(MAX_LEN, max_model_len // 2)
        if max_len < MAX_LEN:
            logger.warning("max_model_len=%d: lengths clipped to %d", max_model_len, max_len)
        workload: Workload = make_workload(args.num_requests or 1000, args.seed,
                                           vocab_size=vocab, max_len=max_len)  # fmt: skip
        if args.max_tokens:
            workload = [(p, args.max_tokens) for p, _ in workload]
    else:
        workload = jsonl[: args.num_requests] if args.num_requests else jsonl
        workload = [(llm.encode_prompt(p)[1], n) for p, n in workload]
    prompts = [p for p, _ in workload]
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        for _, n in workload
    ]
    if args.warmup_requests:
        rng = np.random.default_rng(args.seed + 1)
        warm = [
            rng.integers(0, vocab, WARMUP_PROMPT_LEN).tolist() for _ in range(args.warmup_requests)
        ]
        warm_params = SamplingParams(temperature=0.0, max_tokens=WARMUP_MAX_TOKENS,
                                     ignore_eos=True, detokenize=False)  # fmt: skip
        llm.generate(warm, warm_params, use_tqdm=False)
    llm.reset_stats()
    llm.reset_prefix_cache()

    logger.info("running %d requests", len(prompts))
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=args.progress)
    seconds = time.perf_counter() - start
    stats = llm.stats()

    num_out = [len(o.outputs[0].token_ids) for o in outputs]
    num_in = [len(p) for p in prompts]
    ttft = [o.metrics.time_to_first_token for o in outputs]
    tpot = [
        (o.metrics.finished_time - o.metrics.first_token_time) / (n - 1)
        for o, n in zip(outputs, num_out, strict=True)
        if n > 1
    ]
    pages = [r.num_used_pages for r in llm.timeline]
    sc = llm.scheduler_config
    contiguous = bool(options.get("reserve_full"))
    result = {
        "bench": "paged_jax.throughput",
        "tag": args.tag,
        "mode": "contiguous" if contiguous else "paged",
        "engine_options": options,
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "workload": {
            "source": args.input or args.workload,
            **workload_summary(num_in, [n for _, n in workload]),
        },
        "num_pages": stats["num_pages"],
        "page_size": stats["page_size"],
        "max_model_len": sc.max_model_len,
        "kv_cache_gib": stats["num_pages"]
        * stats["page_size"]
        * stats["kv_bytes_per_token"]
        / 2**30,
        "seconds": seconds,
        "requests_per_s": len(outputs) / seconds,
        "output_tokens": int(sum(num_out)),
        "output_tokens_per_s": sum(num_out) / seconds,
        "total_tokens_per_s": (sum(num_out) + sum(num_in)) / seconds,
        "ttft_s": _dist(ttft),
        "tpot_s": _dist(tpot),
        "latency_s": _dist([o.metrics.latency for o in outputs]),
        "steps": stats["steps"],
        "preemptions": stats["preemptions"],
        "kv_utilization": stats["kv_utilization"],
        "prefix_caching": bool(options.get("enable_prefix_caching", True)),
        "prefix_cache": {
            "queries": stats["prefix_cache_queries"],
            "hits": stats["prefix_cache_hits"],  # prompt tokens whose prefill was saved
            "hit_rate": stats["prefix_cache_hit_rate"],
            "evictions": stats["prefix_cache_evictions"],
        },
        "prompt_tokens_computed": stats["prompt_tokens_computed"],
        "used_pages_frac": {
            "mean": float(np.mean(pages)) / stats["num_pages"],
            "max": float(np.max(pages)) / stats["num_pages"],
        },
        "max_num_seqs_in_step": int(max(r.num_seqs for r in llm.timeline)),
        **_timeline_metrics(llm, copy["bytes_per_s"] if copy else None),
        "copy": copy,
        "compiles_after_warmup": stats["compiles_after_warmup"],
        # the output tokens, in input order: equal digests = the same tokens (async on / off)
        "tokens_sha1": hashlib.sha1(
            np.concatenate([np.asarray(o.outputs[0].token_ids, np.int64) for o in outputs])
        ).hexdigest(),
        "warmup_seconds": llm.warmup_seconds,
        "warmup_buckets": stats["warmup_steps"],
        "load_seconds": stats["load_seconds"],
        "init_seconds": init_s,
        "series": _series(llm, start),
    }
    if args.timeline:  # every step record, times from the start of the timed run
        result["timeline"] = [{**r._asdict(), "time": r.time - start} for r in llm.timeline]
    llm.close()
    return result


def _ms(d: dict[str, float | None]) -> str:
    return " / ".join("n/a" if d[k] is None else f"{1e3 * d[k]:.1f}" for k in ("p50", "p90", "p99"))


def _limit(c: dict[str, Any] | None) -> str:
    if not c:
        return "n/a"
    gb = {k: c[k] / 1e9 for k in ("bytes_per_s", "copy_bytes_per_s", "read_bytes_per_s")}
    return f"{gb['bytes_per_s']:.0f} ({gb['copy_bytes_per_s']:.0f} / {gb['read_bytes_per_s']:.0f})"


def to_markdown(r: dict[str, Any]) -> str:
    w, dec = r["workload"], r["decode"]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    comps = ", ".join(f"{k[:-2]} {1e3 * v:.2f}" for k, v in r["step_component_mean_s"].items())
    rows = [
        ("requests/s", f"{r['requests_per_s']:.2f}"),
        ("output tok/s", f"{r['output_tokens_per_s']:.1f}"),
        ("total tok/s (prompt + output)", f"{r['total_tokens_per_s']:.1f}"),
        ("TTFT p50 / p90 / p99 (ms)", _ms(r["ttft_s"])),
        ("TPOT p50 / p90 / p99 (ms)", _ms(r["tpot_s"])),
        ("KV utilization (tokens / allocated slots, mean)", f"{r['kv_utilization']:.3f}"),
        ("pages in use, mean / max (of num_pages)",
         f"{r['used_pages_frac']['mean']:.3f} / {r['used_pages_frac']['max']:.3f}"),
        ("num_pages x page_size (KV GiB)",
         f"{r['num_pages']} x {r['page_size']} ({r['kv_cache_gib']:.3g})"),
        ("max sequences in a step", str(r["max_num_seqs_in_step"])),
        ("preemptions", str(r["preemptions"])),
        ("prefix cache: hit tokens / queried (rate)",
         f"{r['prefix_cache']['hits']} / {r['prefix_cache']['queries']} "
         f"({r['prefix_cache']['hit_rate']:.3f})"),
        ("prompt tokens computed", str(r["prompt_tokens_computed"])),
        ("decode MBU of the streaming limit (step / device time)",
         f"{fmt(dec['mbu'], '.3f')} / {fmt(dec['mbu_device'], '.3f')}"),
        ("streaming limit (GB/s; copy / read)", _limit(r["copy"])),
        ("decode steps (in bursts), mean sequences",
         f"{dec['steps']} ({dec['bursts']}), {dec['mean_num_seqs']:.1f}"),
        ("host-only (device idle) / host work / dispatch share of step time",
         f"{r['host_overhead_share']:.3f} / {r['host_work_share']:.3f} / "
         f"{r['dispatch_share']:.3f}"),
        ("device idle s / step s (records): bursts, decodes, prefill or mixed", ", ".join(
            f"{v['idle_s']:.3f} / {v['step_s']:.3f} ({v['records']})"
            for v in r["idle_by_kind"].values())),
        ("step mean (ms) and components", f"{1e3 * r['step_mean_s']:.2f}: {comps}"),
        ("three biggest step costs", ", ".join(k[:-2] for k in r["biggest_step_costs"])),
        ("compiles after warmup", str(r["compiles_after_warmup"])),
        ("warmup s (buckets)", f"{r['warmup_seconds']:.1f} ({r['warmup_buckets']})"),
    ]  # fmt: skip
    tag = " - " + r["tag"] if r["tag"] else ""
    head = (
        f"### {r['engine_options']['model']} ({r['mode']}){tag}\n\n"
        f"{r['device']}, jax {r['jax_version']}, {r['date']}. {w['num_requests']} requests "
        f"({w['source']}, seed {r['args']['seed']}): prompt mean {w['prompt_len']['mean']:.0f} "
        f"(max {w['prompt_len']['max']}), output mean {w['output_len']['mean']:.0f} "
        f"(max {w['output_len']['max']}) tokens, ignore_eos, greedy; {r['seconds']:.1f} s.\n\n"
    )
    table = "| metric | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return head + table


def write_plot(r: dict[str, Any], path: Path) -> bool:
    """Throughput and KV pages in use over time; False (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot written")
        return False
    s = {k: [np.nan if v is None else v for v in vs] for k, vs in r["series"].items()}
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    top.plot(s["t_s"], s["tokens_per_s"], label="scheduled tok/s (prompt + output)")
    top.plot(s["t_s"], s["output_tokens_per_s"], label="output tok/s")
    top.set_ylabel("tokens / s")
    top.legend(loc="upper right")
    top.set_title(f"{r['engine_options']['model']} ({r['mode']}), {r['device']}")
    bottom.plot(s["t_s"], [100 * x for x in s["used_pages_frac"]], color="C2")
    bottom.set_ylabel("KV pages in use (%)")
    bottom.set_ylim(0, 105)
    bottom.set_xlabel("seconds")
    seqs = bottom.twinx()
    seqs.plot(s["t_s"], s["num_seqs"], color="C3", alpha=0.6)
    seqs.set_ylabel("sequences per step", color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(r: dict[str, Any], out_dir: str, stem: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    timeline = r.get("timeline")
    r = {k: v for k, v in r.items() if k != "timeline"}
    paths[0].write_text(json.dumps(_finite(r), indent=1) + "\n")
    paths[1].write_text(to_markdown(r))
    if write_plot(r, out / f"{stem}.png"):
        paths.append(out / f"{stem}.png")
    if timeline is not None:
        paths.append(out / f"{stem}.timeline.jsonl")
        paths[-1].write_text("".join(json.dumps(row) + "\n" for row in timeline))
    return paths


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="paged-jax bench",
        description="Offline throughput on a synthetic or JSONL workload. Engine options: "
        "--config yaml and key=value overrides (EngineConfig fields) over the bench defaults "
        + ", ".join(f"{k}={v}" for k, v in BENCH_DEFAULTS.items()),
    )
    add = ap.add_argument
    add("--model", default=None, help="random:<preset>, bundled alias, HF dir, GGUF")
    add("--config", default=None, help="engine yaml (base_config chaining allowed)")
    add("--workload", default="sharegpt", choices=("sharegpt", "shared-prefix"))
    add("--prefix-len", type=int, default=80, help="shared-prefix: tokens of the shared prefix")
    add("--num-requests", type=int, default=None, help="default 1000 (synthetic) / all (JSONL)")
    add("--seed", type=int, default=0)
    add("--input", default=None, help="JSONL: prompt_token_ids or prompt, optional max_tokens")
    add("--max-tokens", type=int, default=None, help="fixed max_tokens for every request")
    add(
        "--contiguous",
        action="store_true",
        help="reserve max_model_len per request (reserve_full=true enable_prefix_caching=false)",
    )
    add("--no-prefix-caching", action="store_true", help="enable_prefix_caching=false")
    add("--warmup-requests", type=int, default=8, help="small requests run before timing")
    add(
        "--copy-bytes",
        type=int,
        default=None,
        help="streaming-limit buffer bytes (default 4 GiB on GPU/TPU, 256 MiB on CPU); 0: no MBU",
    )
    add("--copy-runs", type=int, default=10, help="calls back to back per timing")
    add("--out", default="out/bench", help="directory for the .json, .md and .png")
    add("--tag", default=None, help="names the output files; default <model>-<mode>")
    add("--progress", action="store_true", help="show a progress bar")
    add("--timeline", action="store_true", help="also write every step record (.timeline.jsonl)")
    add("overrides", nargs="*", help="engine config overrides, key=value")
    return ap  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run_bench(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = args.tag or f"{result['engine_options']['model']}-{result['mode']}"
    paths = write_results(result, args.out, re.sub(r"[^A-Za-z0-9_.-]+", "-", stem))
    skip = ("series", "args", "timeline")
    print(json.dumps(_finite({k: v for k, v in result.items() if k not in skip})))
    for path in paths:
        logger.info("wrote %s", path)
    return 0
