"""End-to-end offline throughput benchmark (``paged-jax bench``, ``scripts/bench_throughput.py``).

Runs one ``LLM.generate`` over a workload of ``bench_workload`` (synthetic ShareGPT-like,
shared-prefix, or JSONL) and gathers its figures: throughput, TTFT/TPOT percentiles, KV use
over time, prefix-cache hits, and (``bench_report``) host overhead and decode MBU against the
streaming limit measured in the same run (``runtime.bandwidth``), written as JSON / markdown /
PNG. jax and the engine are imported inside the functions that need them.

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

from paged_jax.bench_report import dist, finite, series, timeline_metrics, write_results
from paged_jax.bench_workload import (
    MAX_LEN,
    Workload,
    make_shared_prefix_workload,
    make_workload,
    read_jsonl,
    workload_summary,
)

logger = logging.getLogger(__name__)

WARMUP_PROMPT_LEN = 16
WARMUP_MAX_TOKENS = 8
BENCH_DEFAULTS: dict[str, Any] = {
    "model": "random:llama2-7b",
    "dtype": "bfloat16",
    "max_num_seqs": 256,
    "max_num_batched_tokens": 2048,
    "max_model_len": 2048,
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
        "ttft_s": dist(ttft),
        "tpot_s": dist(tpot),
        "latency_s": dist([o.metrics.latency for o in outputs]),
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
        **timeline_metrics(llm, copy["bytes_per_s"] if copy else None),
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
        "series": series(llm, start),
    }
    if args.timeline:  # every step record, times from the start of the timed run
        result["timeline"] = [{**r._asdict(), "time": r.time - start} for r in llm.timeline]
    llm.close()
    return result


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
    print(json.dumps(finite({k: v for k, v in result.items() if k not in skip})))
    for path in paths:
        logger.info("wrote %s", path)
    return 0
