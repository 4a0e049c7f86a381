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

Each result is written (and flushed) as soon as its request finishes, and the file is put in
input order at the end. A line's id is its ``id`` field, else its line number (from 1); ids
must be unique. ``--resume`` keeps the results already in ``--output`` and serves only the
other lines, so a job killed at any point and started again with ``--resume`` ends with every
input line exactly once, in input order.

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
from paged_jax.io.jsonl import ResultFile, decode_lines, json_object

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_BEAM_FIELDS = {f.name for f in dataclasses.fields(BeamSearchParams)}


def _parse_line(
    llm: Any, line: str, number: int, beam_width: int | None = None
) -> tuple[str, Any, SamplingParams | BeamSearchParams]:
    """(id, prompt, params) of one jsonl line (``number`` from 1); ValueError naming the
    problem."""
    record = json_object(line, f"line {number}")
    request_id = str(record.get("id", number))
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

    data = Path(args.input).read_bytes()  # before the model load: fail fast
    lines = [(n, text) for n, text in decode_lines(data, args.input)
             if isinstance(text, ValueError) or text.strip()]  # fmt: skip
    ids = _line_ids(lines)
    ResultFile.check_writable(args.output)  # before the work: a bad --output fails now
    group = distributed.initialize(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        from_environment=args.distributed,
    )
    mine = distributed.local_items(list(zip(lines, ids, strict=True)), group)
    my_ids = [request_id for _, (request_id, _) in mine]
    options = {"model": args.model} if args.model else {}
    llm = LLM(config=args.config, overrides=args.overrides, **options)
    # One process writes --output itself; under data parallel each its own file, merged below.
    own = args.output if group.num_processes == 1 else f"{args.output}.process{group.process_id}"
    out = ResultFile(own, resume=args.resume)
    try:
        valid, num_skipped = [], 0
        for (number, text), (request_id, error) in mine:
            if request_id in out:
                num_skipped += 1  # --resume: done by an earlier run
                continue
            try:
                if error is not None:
                    raise ValueError(error)
                if isinstance(text, ValueError):
                    raise text
                _, prompt, params = _parse_line(llm, text, number, args.beam_width)
            except (ValueError, TypeError) as e:
                out.write({"id": request_id, "error": str(e)})
                continue
            valid.append((request_id, prompt, params))
        start = time.perf_counter()
        num_tokens = _serve(llm, valid, out, quiet=args.quiet)
        seconds = time.perf_counter() - start
        out.finish(my_ids)
    except BaseException:
        out.close()
        raise
    results = out.records(my_ids)
    if group.num_processes > 1:
        position = {request_id: k for k, (request_id, _) in enumerate(ids)}
        distributed.write_merged(
            args.output, [(position[r["id"]], r) for r in results], range(len(ids)), group
        )
        Path(own).unlink()
    if args.print:
        for r in results:
            body = r.get("text") if "text" in r else f"ERROR: {r['error']}"
            print(f"--- {r['id']}\n{body}")
    stats = llm.stats()
    summary = {
        "requests": len(valid),
        "errors": sum("error" in r for r in results),
        "resumed": num_skipped,
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


def _serve(llm: Any, valid: list[tuple[str, Any, Any]], out: ResultFile, quiet: bool) -> int:
    """Run every valid line, writing each result as it finishes; returns the output tokens."""
    num_tokens = 0
    sampled = [v for v in valid if isinstance(v[2], SamplingParams)]
    if sampled:  # LLM.generate rejects an empty list; every line may be bad or blank
        outs = llm.generate_as_completed([v[1] for v in sampled], [v[2] for v in sampled],
                                         use_tqdm=not quiet)  # fmt: skip
        for i, o in outs:
            params = sampled[i][2]
            record = {"id": sampled[i][0], **_completion(o.outputs[0], params)}
            if len(o.outputs) > 1:
                record["outputs"] = [_completion(c, params) for c in o.outputs]
            if params.prompt_logprobs is not None:
                record["prompt_logprobs"] = _logprobs_json(o.prompt_logprobs)
            out.write(record)
            num_tokens += sum(len(c.token_ids) for c in o.outputs)
    by_params: dict[BeamSearchParams, list] = {}
    for v in valid:
        if isinstance(v[2], BeamSearchParams):
            by_params.setdefault(v[2], []).append(v)
    for params, group in by_params.items():  # one batched beam search per distinct params
        outs = llm.beam_search_as_completed([v[1] for v in group], params, use_tqdm=not quiet)
        for i, o in outs:
            best = o.sequences[0]
            out.write({
                "id": group[i][0],
                "text": best.text,
                "token_ids": best.token_ids,
                "beams": [dataclasses.asdict(b) for b in o.sequences],
            })  # fmt: skip
            num_tokens += len(best.token_ids)
    return num_tokens


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


def _line_ids(lines: list[tuple[int, str | ValueError]]) -> list[tuple[str, str | None]]:
    """Each line's id: its "id" field, else its line number (from 1, as in the messages).
    Ids must be unique (--resume goes by them): a repeated one makes the later line an error
    written under the id ``"<id> (line N)"``. Returns (id, error or None) per line."""
    ids, seen = [], {}
    for number, text in lines:
        request_id = str(number) if isinstance(text, ValueError) else _line_id(text, number)
        if request_id in seen:
            message = f"line {number}: id {request_id!r} is also line {seen[request_id]}'s"
            ids.append((f"{request_id} (line {number})", message))
            continue
        seen[request_id] = number
        ids.append((request_id, None))
    return ids


def _line_id(line: str, number: int) -> str:
    try:
        record = json.loads(line)
        if isinstance(record, dict) and "id" in record:
            return str(record["id"])
    except json.JSONDecodeError:
        pass
    return str(number)


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
    from paged_jax import __version__

    parser = argparse.ArgumentParser(
        prog="paged-jax", description="paged-jax: batch generation, evaluation and benchmarks"
    )
    parser.add_argument("--version", action="version", version=f"paged-jax {__version__}")
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
    gen.add_argument(
        "--resume", action="store_true", help="keep --output's results, serve only the rest"
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
