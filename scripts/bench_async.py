"""Async scheduling off against on: how long the device waits for the host, same tokens.

Two parts, one JSON line per case and a markdown table (``--out``):

1. ``throughput``: ``paged_jax.bench`` (the synthetic ShareGPT-like workload, greedy,
   ignore_eos) once per (decode_steps, async_scheduling) case. Reports the host-only share
   (``StepRecord.idle_s``: the device waited for the host, an upper bound), the host's own
   work share (schedule + pack + update, overlapped when async), the dispatch share, output
   tok/s, and whether the output tokens of off and on are identical (their sha1).
2. ``masks``: a batch of JSON-schema requests (a grammar mask per row per step) on a model
   with a tokenizer (default the bundled SmolLM2): host mask ms per step, the share of it made
   while the step's forward still ran on the device (hidden), and the step time, off and on.

    PYTHONPATH=$PWD python scripts/bench_async.py --model random:llama-1b   # on the GPU
    PYTHONPATH=$PWD python scripts/bench_async.py --model random:tiny --num-requests 256 \\
        --part throughput,masks max_num_batched_tokens=512 max_model_len=512  # on a CPU

A random model has no tokenizer: part 2 is then skipped (say ``--mask-model`` to pick one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paged_jax import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from paged_jax.bench import build_parser, run_bench  # noqa: E402

KEYS = ("host_overhead_share", "host_work_share", "dispatch_share", "output_tokens_per_s",
        "step_mean_s", "steps", "compiles_after_warmup", "tokens_sha1")  # fmt: skip
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def throughput(args: argparse.Namespace) -> list[dict]:
    rows = []
    for steps in args.decode_steps:
        for on in (False, True):
            argv = ["--model", args.model, "--copy-bytes", "0", "--seed", str(args.seed),
                    f"decode_steps={steps}", f"async_scheduling={str(on).lower()}",
                    *args.overrides]  # fmt: skip
            if args.num_requests:
                argv += ["--num-requests", str(args.num_requests)]
            result = run_bench(build_parser().parse_intermixed_args(argv))
            row = {"part": "throughput", "model": args.model, "decode_steps": steps,
                   "async_scheduling": on, "device": result["device"],
                   "jax": result["jax_version"], **{k: result[k] for k in KEYS}}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    by = {(r["decode_steps"], r["async_scheduling"]): r for r in rows}
    for r in rows:
        r["same_tokens"] = r["tokens_sha1"] == by[(r["decode_steps"], False)]["tokens_sha1"]
    return rows


def masks(args: argparse.Namespace) -> list[dict]:
    llm = LLM(args.mask_model, max_model_len=256, max_num_seqs=args.mask_seqs,
              max_num_batched_tokens=256, warmup_progress=False)  # fmt: skip
    if llm.tokenizer is None:
        print(f"masks: {args.mask_model} has no tokenizer: skipped", file=sys.stderr)
        llm.close()
        return []
    prompts = [f"Person {i}: give their name and age as JSON." for i in range(args.mask_seqs)]
    so = StructuredOutputsParams(json=PERSON)
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=48, min_tokens=8,
                            structured_outputs=so)  # fmt: skip
    rows, tokens = [], {}
    for on in (False, True, False, True):  # the second pair is the one reported
        llm._driver.stepper.async_scheduling = on
        llm.generate(prompts[:2], params, use_tqdm=False)  # lazy compiles of this mode
        llm.reset_stats()
        before = llm.stats()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = llm.stats()
        mask_s = stats["mask_seconds"] - before["mask_seconds"]
        hidden_s = stats["mask_hidden_seconds"] - before["mask_hidden_seconds"]
        num_steps = stats["mask_steps"] - before["mask_steps"]
        timeline = llm.timeline
        tokens[on] = [o.outputs[0].token_ids for o in outs]
        rows.append({
            "part": "masks", "model": args.mask_model, "seqs": args.mask_seqs,
            "async_scheduling": on, "steps": len(timeline),
            "step_ms": round(1e3 * sum(r.step_s for r in timeline) / len(timeline), 3),
            "host_mask_ms_per_step": round(1e3 * mask_s / max(num_steps, 1), 3),
            "mask_hidden_share": round(hidden_s / mask_s, 3) if mask_s else None,
            "host_only_share": round(sum(r.idle_s for r in timeline)
                                     / sum(r.step_s for r in timeline), 3),
            "seconds": round(seconds, 3),
        })  # fmt: skip
    rows = rows[2:]
    for r in rows:
        r["same_tokens"] = tokens[True] == tokens[False]
        print(json.dumps(r), flush=True)
    llm.close()
    return rows


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_markdown(rows: list[dict]) -> str:
    out = []
    for part in ("throughput", "masks"):
        sel = [r for r in rows if r["part"] == part]
        if not sel:
            continue
        keys = [k for k in sel[0] if k not in ("part", "tokens_sha1")]
        out.append("| " + " | ".join(keys) + " |")
        out.append("|" + " --- |" * len(keys))
        out += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in sel]
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama-1b")
    ap.add_argument("--num-requests", type=int, default=None, help="default: the bench's 1000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-steps", default="1,8", help="comma-separated cases")
    ap.add_argument("--part", default="throughput", help="throughput, masks or both (comma)")
    ap.add_argument("--mask-model", default="smollm2-135m")
    ap.add_argument("--mask-seqs", type=int, default=16)
    ap.add_argument("--out", default=None, help="markdown file for the table")
    ap.add_argument("overrides", nargs="*", help="engine key=value overrides for the bench")
    args = ap.parse_args()
    args.decode_steps = [int(x) for x in args.decode_steps.split(",")]
    args.part = args.part.split(",")
    rows = (throughput(args) if "throughput" in args.part else []) + (
        masks(args) if "masks" in args.part else []
    )
    table = to_markdown(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
