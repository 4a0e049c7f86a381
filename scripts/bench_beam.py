"""Beam search throughput: paged_jax ``LLM.beam_search`` against HF transformers'
``generate(num_beams=k)`` on the same card, the same random-weight shape and the same prompts
(``bench_workload.make_workload``, first ``--num-requests``), fixed ``--max-tokens``, no EOS.

Tokens/s counts the returned best beam's tokens per request. HF runs static batches of
``--hf-batch-size`` prompts (left-padded), the engine one continuous batch. Prints one JSON
line per implementation::

    python scripts/bench_beam.py --model random:llama2-7b --beam-width 4   # on a GPU
    python scripts/bench_beam.py --model random:tiny --skip-hf dtype=float32
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from paged_jax.bench_workload import make_workload  # noqa: E402
from paged_jax.config import parse_overrides  # noqa: E402


def run_engine(args, workload) -> dict:
    from paged_jax import LLM, BeamSearchParams

    options = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "max_model_len": 2048,
               **parse_overrides(args.overrides)}  # fmt: skip
    llm = LLM(args.model, **options)
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.max_tokens,
                              ignore_eos=True)  # fmt: skip
    prompts = [p for p, _ in workload]
    llm.beam_search(prompts[:2], params, use_tqdm=False)  # warm
    llm.reset_stats()
    start = time.perf_counter()
    outs = llm.beam_search(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.sequences[0].token_ids) for o in outs)
    stats = llm.stats()
    llm.close()
    return {"impl": "paged_jax", "seconds": seconds, "tok_s": tokens / seconds,
            "kv_sharing_saving": stats["kv_sharing_saving"],
            "compiles_after_warmup": stats["compiles_after_warmup"]}  # fmt: skip


def run_hf(args, workload) -> dict:
    import torch

    spec = importlib.util.spec_from_file_location("bench_hf", HERE / "bench_hf.py")
    bench_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_hf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = bench_hf.build_model(args.model, device, dtype, "sdpa", seed=0)
    batches = bench_hf.make_batches(workload, args.hf_batch_size)
    kwargs = dict(num_beams=args.beam_width, num_return_sequences=1, do_sample=False,
                  max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens)  # fmt: skip
    with torch.no_grad():
        ids, mask, _, _ = batches[0]
        model.generate(torch.tensor(ids[:1], device=device), **kwargs)  # warm
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for ids, mask, _, _ in batches:
            model.generate(torch.tensor(ids, device=device),
                           attention_mask=torch.tensor(mask, device=device), **kwargs)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    tokens = len(workload) * args.max_tokens
    return {"impl": "hf_transformers", "seconds": seconds, "tok_s": tokens / seconds,
            "batch_size": args.hf_batch_size}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:llama2-7b")
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("overrides", nargs="*", help="engine key=value overrides")
    args = ap.parse_args()
    from paged_jax.model.presets import preset_config

    vocab = preset_config(args.model.removeprefix("random:")).vocab_size
    workload = make_workload(args.num_requests, vocab_size=vocab, max_len=512)
    rows = [run_engine(args, workload)]
    if not args.skip_hf:
        rows.append(run_hf(args, workload))
    for row in rows:
        print(json.dumps({"model": args.model, "beam_width": args.beam_width, **row}))
    if len(rows) == 2:
        print(f"paged_jax / HF beam search: {rows[0]['tok_s'] / rows[1]['tok_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
