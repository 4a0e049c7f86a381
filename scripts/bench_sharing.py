"""KV memory saved by sharing pages: parallel sampling (n > 1) and beam search.

For each n (and beam width) it runs the ShareGPT-like workload of ``paged_jax.bench`` (random
prompt ids, so no two requests share a prefix: every saving comes from the group's own
sharing) and records, at every step, the pages in use against the pages the same sequences
would hold without sharing (each completion / beam its own copy of every page: the sum of the
page tables' lengths). Saving = 1 - sum(pages in use) / sum(pages without sharing) over the
steps — the PagedAttention paper's Fig. 15 measure. With ``--throughput`` it also times n = 4
against four separate requests, and beam width 4.

Page counts depend on lengths, not weights or device: the memory figures are the same on a
CPU with ``random:tiny`` as on a GPU with a 7B shape; throughput needs the real shape::

    python scripts/bench_sharing.py --model random:tiny --num-requests 100 dtype=float32
    python scripts/bench_sharing.py --model random:llama2-7b --throughput   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paged_jax import LLM, BeamSearchParams, SamplingParams  # noqa: E402
from paged_jax.bench_workload import make_workload  # noqa: E402
from paged_jax.config import parse_overrides  # noqa: E402

PAPER = {  # Fig. 15, ShareGPT
    "parallel": "16.2-30.5%",
    "beam": "44.3-66.3%",
}


def run(llm: LLM, workload, n: int = 1, beam_width: int = 0) -> dict:
    llm.reset_stats()
    llm.reset_prefix_cache()
    prompts = [p for p, _ in workload]
    start = time.perf_counter()
    if beam_width:
        params = [BeamSearchParams(beam_width=beam_width, max_tokens=m, ignore_eos=True)
                  for _, m in workload]  # fmt: skip
        outs = llm.beam_search(prompts, params, use_tqdm=False)
        num_out = sum(len(o.sequences[0].token_ids) for o in outs)
    else:
        params = [
            SamplingParams(n=n, temperature=1.0, seed=i, max_tokens=m, ignore_eos=True,
                           detokenize=False)
            for i, (_, m) in enumerate(workload)
        ]  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        num_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    seconds = time.perf_counter() - start
    stats = llm.stats()
    return {
        "n": n,
        "beam_width": beam_width,
        "saving": stats["kv_sharing_saving"],
        "mean_pages_in_use": sum(r.num_used_pages for r in llm.timeline) / len(llm.timeline),
        "mean_pages_unshared": sum(r.num_table_pages for r in llm.timeline) / len(llm.timeline),
        "output_tokens": num_out,
        "seconds": seconds,
        "output_tok_s": num_out / seconds,
        "preemptions": stats["preemptions"],
        "compiles_after_warmup": stats["compiles_after_warmup"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--beam-requests", type=int, default=20)
    ap.add_argument("--max-len", type=int, default=256, help="clip prompt and output lengths")
    ap.add_argument("--throughput", action="store_true", help="also n=4 vs 4 separate")
    ap.add_argument("--out", default="out/bench/sharing.json")
    ap.add_argument("overrides", nargs="*", help="engine key=value overrides")
    args = ap.parse_args()
    options = {"max_num_seqs": 64, "max_num_batched_tokens": 512, "max_model_len": 1024,
               "decode_steps": 8, **parse_overrides(args.overrides)}  # fmt: skip
    llm = LLM(args.model, **options)
    vocab = llm.model_config.vocab_size
    workload = make_workload(args.num_requests, vocab_size=vocab, max_len=args.max_len)
    rows = [run(llm, workload, n=n) for n in (2, 4, 6)]
    beams = make_workload(args.beam_requests, vocab_size=vocab, max_len=args.max_len // 4)
    rows += [run(llm, beams, beam_width=w) for w in (2, 4, 6)]
    if args.throughput:
        rows.append(run(llm, [w for w in workload for _ in range(4)], n=1) | {"as": "4 x n=1"})
    for r in rows:
        print(json.dumps(r))
    print("\n| case | saving (ours) | paper (ShareGPT) | pages in use / without sharing |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        case = f"beam width {r['beam_width']}" if r["beam_width"] else f"n = {r['n']}"
        paper = PAPER["beam" if r["beam_width"] else "parallel"]
        print(f"| {case} | {100 * r['saving']:.1f}% | {paper} | "
              f"{r['mean_pages_in_use']:.0f} / {r['mean_pages_unshared']:.0f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "options": options, "rows": rows}, indent=1))
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
