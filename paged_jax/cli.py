"""``paged-jax``: the command line.

``paged-jax generate --model M --input in.jsonl --output out.jsonl [--config c.yaml] [k=v ...]``
reads one request per line (``prompt`` or ``messages``, optional ``id`` and sampling fields),
serves every valid line in one continuous batch, and writes one line per input line in input
order: ``id, text, token_ids, finish_reason`` — or ``id, error`` for a line that could not be
served. A bad line never stops the others. With ``n`` > 1 the line also gets ``outputs``, every
completion in order (the top-level fields are completion 0's). A line with ``beam_width`` (or
every line, with ``--beam-width K``) runs beam search (fields: ``beam_width, max_tokens,
length_penalty, early_stopping, ignore_eos``) and gets ``beams``: ``text, token_ids, score``
best first (the top-level fields are the best beam's). A line that sets ``logprobs`` also gets
``logprobs`` (per token ``{id: {logprob, rank, decoded_token}}``) and ``cumulative_logprob``;
``prompt_logprobs`` gets ``prompt_logprobs`` (null for the first prompt token); ``stop`` or
``stop_token_ids`` gets ``stop_reason``. ``structured_outputs`` takes vLLM's fields as an object
(``{"json": {...schema...}}``, ``{"regex": ...}``, ``{"choice": [...]}``, ``{"grammar": ...}``).
Data parallel: run one process per share with ``--coordinator-address/--num-processes/
--process-id`` (or ``--distributed``, the job from the environment); process 0 merges the
outputs (``paged_jax.distributed``).

``paged-jax eval --config configs/eval/<name>.yaml [key=value ...]`` or
``paged-jax eval --gin-file configs/eval/<name>.gin [--gin-param 'x.y=z' ...]`` runs an
evaluation (``paged_jax.eval``), writes its JSON result and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from paged_jax.engine.beam import BeamSearchParams
from paged_jax.engine.sampling_params import SamplingParams
from paged_jax.io.jsonl import json_object

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_BEAM_FIELDS = {f.name for f in dataclasses.fields(BeamSearchParams)}


def _parse_line(
    llm: Any, line: str, index: int, beam_width: int | None = None
) -> tuple[str, Any, SamplingParams | BeamSearchParams]:
    """(id, prompt, params) of one jsonl line; ValueError naming the problem."""
    record = json_object(line, f"line {index + 1}")
    request_id = str(record.get("id", index))
    has = [k for k in ("prompt", "messages", "prompt_token_ids") if k in record]
    if len(has) != 1:
        raise ValueError("exactly one of 'prompt', 'messages', 'prompt_token_ids' is required")
    beam = "beam_width" in record or beam_width is not None
    fields = _BEAM_FIELDS if beam else _SAMPLING_FIELDS
    unknown = sorted(set(record) - fields - {"id", has[0]})
    if unknown:
        kind = "beam search" if beam else "sampling"
        raise ValueError(f"unknown field(s) {unknown} for {kind}")
    values = {k: v for k, v in record.items() if k in fields}
    if beam:
        values.setdefault("beam_width", beam_width)
        params: SamplingParams | BeamSearchParams = BeamSearchParams(**values)
    else:
        params = SamplingParams(**values)
    prompt = record[has[0]]
    llm.check_request(prompt, params)
    return request_id, prompt, params


def generate(args: argparse.Namespace) -> int:
    from paged_jax import distributed
    from paged_jax.llm import LLM

    lines = Path(args.input).read_text().splitlines()  # before the model load: fail fast
    group = distributed.initialize(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        from_environment=args.distributed,
    )
    numbered = [(i, line) for i, line in enumerate(lines) if line.strip()]
    options = {"model": args.model} if args.model else {}
    llm = LLM(config=args.config, overrides=args.overrides, **options)
    results: list[dict[str, Any] | None] = []
    indices: list[int] = []  # input line of each result
    valid: list[tuple[int, str, Any, SamplingParams]] = []
    for i, line in distributed.local_items(numbered, group):
        indices.append(i)
        try:
            request_id, prompt, params = _parse_line(llm, line, i, args.beam_width)
        except (ValueError, TypeError) as e:
            results.append({"id": _line_id(line, i), "error": str(e)})
            continue
        valid.append((len(results), request_id, prompt, params))
        results.append(None)
    start = time.perf_counter()
    sampled = [v for v in valid if isinstance(v[3], SamplingParams)]
    beams = [v for v in valid if isinstance(v[3], BeamSearchParams)]
    num_tokens = 0
    if sampled:  # LLM.generate rejects an empty list; every line may be bad or blank
        outs = llm.generate([v[2] for v in sampled], [v[3] for v in sampled],
                            use_tqdm=not args.quiet)  # fmt: skip
        for (slot, request_id, _, params), out in zip(sampled, outs, strict=True):
            results[slot] = {"id": request_id, **_completion(out.outputs[0], params)}
            if len(out.outputs) > 1:
                results[slot]["outputs"] = [_completion(c, params) for c in out.outputs]
            if params.prompt_logprobs is not None:
                results[slot]["prompt_logprobs"] = _logprobs_json(out.prompt_logprobs)
            num_tokens += sum(len(c.token_ids) for c in out.outputs)
    by_params: dict[BeamSearchParams, list] = {}
    for v in beams:
        by_params.setdefault(v[3], []).append(v)
    for params, lines in by_params.items():  # one batched beam_search per distinct params
        outs = llm.beam_search([v[2] for v in lines], params, use_tqdm=not args.quiet)
        for (slot, request_id, _, _), out in zip(lines, outs, strict=True):
            best = out.sequences[0]
            results[slot] = {
                "id": request_id,
                "text": best.text,
                "token_ids": best.token_ids,
                "beams": [dataclasses.asdict(b) for b in out.sequences],
            }
            num_tokens += len(best.token_ids)
    seconds = time.perf_counter() - start
    distributed.write_merged(
        args.output, zip(indices, results, strict=True), [i for i, _ in numbered], group
    )
    if args.print:
        for r in results:
            body = r.get("text") if "text" in r else f"ERROR: {r['error']}"
            print(f"--- {r['id']}\n{body}")
    stats = llm.stats()
    summary = {
        "requests": len(valid),
        "errors": len(results) - len(valid),
        "output_tokens": num_tokens,
        "seconds": round(seconds, 3),
        "output_tok_s": round(num_tokens / seconds, 2) if seconds else 0.0,
        "preemptions": stats["preemptions"],
        "kv_utilization": round(stats["kv_utilization"], 4),
        "prefix_cache_queries": stats["prefix_cache_queries"],
        "prefix_cache_hits": stats["prefix_cache_hits"],
        "prefix_cache_hit_rate": round(stats["prefix_cache_hit_rate"], 4),
        "compiles_after_warmup": stats["compiles_after_warmup"],
        "warmup_seconds": round(stats["warmup_seconds"], 2),
    }
    if group.num_processes > 1:
        summary["process"] = f"{group.process_id}/{group.num_processes}"
    print("summary " + json.dumps(summary))
    return 0


def _completion(c: Any, params: SamplingParams) -> dict[str, Any]:
    out = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
    if params.stop is not None or params.stop_token_ids:
        out["stop_reason"] = c.stop_reason
    if params.logprobs is not None:
        out["logprobs"] = _logprobs_json(c.logprobs)
        out["cumulative_logprob"] = c.cumulative_logprob
    return out


def _logprobs_json(entries: list[dict[int, Any] | None]) -> list[dict[str, Any] | None]:
    """Per position {token id (a JSON key, so a str): {logprob, rank, decoded_token}}."""
    return [
        None if e is None else {str(t): dataclasses.asdict(lp) for t, lp in e.items()}
        for e in entries
    ]


def _line_id(line: str, index: int) -> str:
    try:
        record = json.loads(line)
        if isinstance(record, dict) and "id" in record:
            return str(record["id"])
    except json.JSONDecodeError:
        pass
    return str(index)


def evaluate(args: argparse.Namespace) -> int:
    from paged_jax.eval.loaders import load_gin, load_yaml
    from paged_jax.eval.runner import run_eval, summary_line

    if bool(args.config) == bool(args.gin_file):
        raise ValueError("give exactly one of --config (yaml) and --gin-file")
    if args.gin_file:
        if args.overrides:
            raise ValueError(
                f"key=value overrides {args.overrides} go with --config; "
                "use --gin-param with --gin-file"
            )
        cfg = load_gin(args.gin_file, args.gin_param)
    else:
        if args.gin_param:
            raise ValueError("--gin-param goes with --gin-file")
        cfg = load_yaml(args.config, args.overrides)
    result = run_eval(cfg, progress=not args.quiet)
    print(summary_line(result, cfg.output_path))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paged-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="batch generation over a jsonl file")
    gen.add_argument("--model", help="bundled alias, HF directory or .gguf (default: config's)")
    gen.add_argument("--input", required=True, help="jsonl: prompt|messages, id, sampling fields")
    gen.add_argument("--output", required=True, help="jsonl written in input order")
    gen.add_argument("--config", help="engine yaml (base_config chaining allowed)")
    gen.add_argument("--print", action="store_true", help="also print each result")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--beam-width", type=int, default=None, help="beam search on every line")
    gen.add_argument("--coordinator-address", help="data parallel: host:port of process 0")
    gen.add_argument("--num-processes", type=int, help="data parallel: processes in the job")
    gen.add_argument("--process-id", type=int, help="data parallel: this process, 0-based")
    gen.add_argument(
        "--distributed",
        action="store_true",
        help="data parallel, the job taken from the environment (TPU, SLURM, MPI)",
    )
    gen.add_argument("overrides", nargs="*", help="engine config overrides, key=value")
    ev = sub.add_parser("eval", help="evaluation run from a yaml or gin config")
    ev.add_argument("--config", help="eval yaml (configs/eval/*.yaml)")
    ev.add_argument("--gin-file", action="append", default=[], help="eval gin file(s)")
    ev.add_argument("--gin-param", action="append", default=[], help="gin binding, x.y=z")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("overrides", nargs="*", help="yaml overrides, dotted key=value")
    sub.add_parser(
        "bench", help="offline throughput benchmark (paged_jax.bench; --help)", add_help=False
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from paged_jax.bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return evaluate(args) if args.command == "eval" else generate(args)
    except (ValueError, OSError) as e:  # OSError: a missing/unreadable input or config
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
